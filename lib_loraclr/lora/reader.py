"""Read any supported LoRA file into a ``LoraFile`` of canonical targets.

Files are untrusted: ``.safetensors`` is read by safetensors, pickle-based files only by
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping

import regex
import torch
from safetensors import SafetensorError, safe_open

from ..weights import PICKLE_SUFFIXES, load_pickled_tensors
from .base import ARCHITECTURES, LoraFile, LoraFormatError, sidecar_path
from .keys import KOHYA_PREFIXES, diffusers_to_target, kohya_to_target, conv_kernel_hint
from .modules import ALPHA, ShapeError, module_class_for

TOP_TAGS = 3  # trigger words taken from ss_tag_frequency when no sidecar names them

# Cross-attention context width (in-features of attn2.to_k/to_v) -> architecture.
CONTEXT_WIDTH_ARCH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# Dotted-format LoRA keys (diffusers, PEFT, old attention processors): pattern -> role.
# The ``path`` group is the module path (old processor keys keep ``to_k`` of ``to_k_lora``).
_DOTTED_SUFFIXES = (
    (re.compile(r"(?P<path>.+)\.lora_A(?:\.[^.]+)?\.weight"), "lora_down.weight"),
    (re.compile(r"(?P<path>.+)\.lora_B(?:\.[^.]+)?\.weight"), "lora_up.weight"),
    (re.compile(r"(?P<path>.+)\.(?:lora|lora_linear_layer)\.down\.weight"), "lora_down.weight"),
    (re.compile(r"(?P<path>.+)\.(?:lora|lora_linear_layer)\.up\.weight"), "lora_up.weight"),
    (re.compile(r"(?P<path>.+\.to_(?:q|k|v|out))_lora\.down\.weight"), "lora_down.weight"),
    (re.compile(r"(?P<path>.+\.to_(?:q|k|v|out))_lora\.up\.weight"), "lora_up.weight"),
    (re.compile(r"(?P<path>.+)\.alpha"), ALPHA),
)

# kohya suffix spellings that mean the same role.
_KOHYA_ROLE_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}

# Module paths of CLIP text encoders (PEFT files carry no component prefix).
_CLIP_MODULE_NAMES = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


class ArchMismatchError(ValueError):
    """LoRAs made for different base models were used together."""


MAX_HEADER_BYTES = 32 * 2**20  # a LoRA's header (key table + metadata); large training-tag lists take a few MiB
MAX_TENSORS = 50_000  # an SDXL LoHa with Tucker cores on every layer holds about 18,000
MAX_SIDECAR_BYTES = 2**20
MAX_JSON_BYTES = 8 * 2**20  # one metadata value parsed as JSON (ss_tag_frequency)


def _safetensors_header_size(path: str, name: str) -> None:
    """Refuse an absurd declared header before safetensors allocates it."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise LoraFormatError(f"{name}: not a readable safetensors file (shorter than its 8-byte header length)")
    size = int.from_bytes(head, "little")
    if size > MAX_HEADER_BYTES:
        raise LoraFormatError(f"{name}: not a readable safetensors file (its header claims {size} bytes, "
                              f"more than the {MAX_HEADER_BYTES // 2**20} MiB a LoRA header needs)")


def _check_tensor(name: str, key: str, tensor: torch.Tensor) -> None:
    """Only finite floating-point tensors (an integer alpha is fine): bool, complex or NaN/Inf are refused."""
    if tensor.dtype == torch.bool or tensor.is_complex() or (not tensor.is_floating_point() and not key.endswith(ALPHA)):
        raise LoraFormatError(f"{name}: key {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                              "LoRA factors are floating-point")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise LoraFormatError(f"{name}: key {key!r} holds NaN or infinite values")


def _load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFormatError(f"{name}: no such file ({path})")
    if path.lower().endswith(".safetensors"):
        try:
            _safetensors_header_size(path, name)
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                keys = list(f.keys())
                if len(keys) > MAX_TENSORS:
                    raise LoraFormatError(f"{name}: holds {len(keys)} tensors, more than a LoRA has ({MAX_TENSORS})")
                tensors = {key: f.get_tensor(key) for key in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
            if isinstance(exc, LoraFormatError):
                raise
            raise LoraFormatError(f"{name}: not a readable safetensors file ({exc})") from exc
    elif path.lower().endswith(PICKLE_SUFFIXES):
        try:
            tensors, metadata = load_pickled_tensors(path), {}
        except ValueError as exc:
            raise LoraFormatError(f"{name}: {str(exc).removeprefix(path + ': ')}") from exc
        if len(tensors) > MAX_TENSORS:
            raise LoraFormatError(f"{name}: holds {len(tensors)} tensors, more than a LoRA has ({MAX_TENSORS})")
    else:
        raise LoraFormatError(f"{name}: unsupported file type (use .safetensors, .pt, .ckpt, .bin)")
    for key, tensor in tensors.items():
        _check_tensor(name, key, tensor)
    return tensors, metadata


def _json_value(text, limit: int = MAX_JSON_BYTES):
    """JSON of bounded size and depth with finite numbers only; None when it is anything else."""
    if not isinstance(text, (str, bytes)) or len(text) > limit:
        return None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not a number")


def _adapter_config(path: str) -> dict:
    """PEFT's adapter_config.json beside the file, or {}."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not os.path.isfile(config_path):
        return {}
    name = os.path.basename(path)
    if os.path.getsize(config_path) > MAX_SIDECAR_BYTES:
        raise LoraFormatError(f"{name}: {config_path} is larger than {MAX_SIDECAR_BYTES // 2**10} KiB")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = _json_value(f.read())
    except (OSError, ValueError) as exc:
        raise LoraFormatError(f"{name}: unreadable {config_path} ({exc})") from exc
    if not isinstance(config, dict):
        raise LoraFormatError(f"{name}: {config_path} is not a JSON object of finite values")
    return config


def _config_number(config: Mapping, key: str, name: str, value=None) -> float:
    value = config[key] if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e6:
        raise LoraFormatError(f"{name}: adapter_config.json {key} must be a positive number, got {value!r}")
    return float(value)


def _pattern_matches(pattern, path: str, name: str) -> bool:
    """PEFT's per-module patterns are regular expressions; a hostile one must not hang the reader."""
    if not isinstance(pattern, str) or len(pattern) > 500:
        raise LoraFormatError(f"{name}: adapter_config.json pattern {str(pattern)[:40]!r} is not a short string")
    try:
        return regex.fullmatch(rf"(.*\.)?(?:{pattern})", path, timeout=0.5) is not None
    except (regex.error, TimeoutError) as exc:
        raise LoraFormatError(f"{name}: adapter_config.json pattern {pattern!r} is not a usable pattern ({exc})") from None


def _peft_alpha(config: dict, path: str, name: str) -> float | None:
    """The alpha giving PEFT's scale (lora_alpha / r, or / sqrt(r) with rsLoRA) for one module."""
    if "lora_alpha" not in config:
        return None
    alpha = _config_number(config, "lora_alpha", name)
    rank = _config_number(config, "r", name) if "r" in config else 8.0
    for key, table in (("alpha_pattern", config.get("alpha_pattern")), ("rank_pattern", config.get("rank_pattern"))):
        if table is not None and not isinstance(table, dict):
            raise LoraFormatError(f"{name}: adapter_config.json {key} must be an object")
        for pattern, value in (table or {}).items():
            if _pattern_matches(pattern, path, name):
                if key == "alpha_pattern":
                    alpha = _config_number(config, key, name, value)
                else:
                    rank = _config_number(config, key, name, value)
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)
    return alpha


def _default_component(config: dict, paths: list[str]) -> str:
    """Component of prefix-less PEFT keys: text encoder when they name CLIP modules."""
    targets = config.get("target_modules") or []
    if isinstance(targets, list) and targets and set(targets) <= _CLIP_MODULE_NAMES:
        return "text_encoder"
    if paths and all(p.startswith(("text_model.", "encoder.layers.")) for p in paths):
        return "text_encoder"
    return "unet"


def _split_key(key: str) -> tuple[str, str, str]:
    """key -> (family, module key, role). family is "kohya" or "dotted"."""
    if key.startswith(tuple(KOHYA_PREFIXES)):
        module_key, _, suffix = key.partition(".")
        return "kohya", module_key, _KOHYA_ROLE_ALIASES.get(suffix, suffix)
    for pattern, role in _DOTTED_SUFFIXES:
        m = pattern.fullmatch(key)
        if m is not None:
            return "dotted", m.group("path"), role
    module_key, _, suffix = key.rpartition(".")
    return "dotted", module_key, suffix


def _detect_format(keys: list[str]) -> str:
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    return "diffusers"


def _arch_from_metadata(metadata: dict[str, str]) -> str | None:
    own = metadata.get("loraclr_arch")
    if own in ARCHITECTURES:
        return own
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def _detect_arch(metadata: dict[str, str], modules: dict) -> str | None:
    arch = _arch_from_metadata(metadata)
    if arch is not None:
        return arch
    if any(m.component == "text_encoder_2" for m in modules.values()):
        return "sdxl"
    for target, module in modules.items():
        if target.startswith("unet.") and target.endswith(("attn2.to_k", "attn2.to_v")):
            arch = CONTEXT_WIDTH_ARCH.get(module.weight_shape[1])
            if arch is not None:
                return arch
    return None


def _read_sidecar(path: str) -> dict:
    """A1111's user metadata beside the LoRA; {} when there is none or it is not JSON (A1111 ignores those too)."""
    sidecar = sidecar_path(path)
    if not os.path.isfile(sidecar):
        return {}
    if os.path.getsize(sidecar) > MAX_SIDECAR_BYTES:
        raise LoraFormatError(f"{os.path.basename(path)}: its sidecar {os.path.basename(sidecar)} is larger than "
                              f"{MAX_SIDECAR_BYTES // 2**10} KiB; a sidecar holds a few lines of metadata")
    try:
        with open(sidecar, "rb") as f:
            data = _json_value(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _words(text: str) -> str:
    """Whitespace (newlines, tabs) collapsed to single spaces."""
    return " ".join(text.split())


def _triggers(path: str, metadata: dict[str, str]) -> list[str]:
    """Sidecar ``activation text`` (comma separated), else the most frequent training tags.

    Unreadable training tags (not JSON, NaN counts, absurd nesting) give no triggers, as they
    give A1111 no tag list: the file is still a usable LoRA.
    """
    activation = _read_sidecar(path).get("activation text")
    if isinstance(activation, str) and activation.strip():
        return [_words(word) for word in activation.split(",") if word.strip()]
    frequency = _json_value(metadata.get("ss_tag_frequency", "{}"))
    counts: Counter[str] = Counter()
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if isinstance(tags, dict):
                counts.update({
                    _words(tag): int(n) for tag, n in tags.items()
                    if isinstance(n, (int, float)) and not isinstance(n, bool) and 0 < n < 2**53
                })
    return [tag for tag, _ in counts.most_common(TOP_TAGS) if tag]


def read_lora(path: str) -> LoraFile:
    """Read a kohya / LyCORIS / diffusers / PEFT LoRA file; LoraFormatError if we cannot."""
    name = os.path.basename(path)
    tensors, metadata = _load_tensors(path)
    if not tensors:
        raise LoraFormatError(f"{name}: holds no tensors, not a LoRA file")
    keys = list(tensors)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    families: dict[str, str] = {}
    for key in keys:
        family, module_key, role = _split_key(key)
        if role in groups[module_key]:
            raise LoraFormatError(f"{name}: key {key!r} repeats role {role!r} of {module_key!r}")
        groups[module_key][role] = tensors[key]
        families[module_key] = family
    config = _adapter_config(path)
    dotted_paths = [k.removeprefix("base_model.model.") for k, f in families.items() if f == "dotted"]
    default_component = _default_component(config, dotted_paths)

    modules = {}
    for module_key, group in groups.items():
        cls = module_class_for(set(group))
        if cls is None:
            roles = ", ".join(sorted(group))
            raise LoraFormatError(
                f"{name}: key {module_key!r} has a module type we cannot read (parts: {roles})"
            )
        try:
            if families[module_key] == "kohya":
                target = kohya_to_target(module_key)
            else:
                target = diffusers_to_target(module_key, default_component)
        except ValueError as exc:
            raise LoraFormatError(f"{name}: key {module_key!r}: {exc}") from exc
        if ALPHA not in group and families[module_key] == "dotted":
            alpha = _peft_alpha(config, module_key.removeprefix("base_model.model."), name)
            if alpha is not None:
                group[ALPHA] = torch.tensor(alpha)
        if target in modules:
            raise LoraFormatError(f"{name}: key {module_key!r} names {target!r} a second time")
        module = cls(target=target, tensors=group, kernel=conv_kernel_hint(target))
        try:
            module.check_shapes()
        except ShapeError as exc:
            raise LoraFormatError(f"{name}: key {module_key!r}: tensor shapes do not fit ({exc})") from None
        modules[target] = module
    return LoraFile(
        path=path,
        format=_detect_format(keys),
        arch=_detect_arch(metadata, modules),
        modules=modules,
        metadata=metadata,
        triggers=_triggers(path, metadata),
    )


def check_same_arch(loras: list[LoraFile]) -> str | None:
    """The one architecture of ``loras`` (None if none can be told); raise if they differ."""
    archs = {lora.arch for lora in loras if lora.arch is not None}
    if len(archs) > 1:
        listing = ", ".join(f"{lora.name} ({lora.arch or 'unknown'})" for lora in loras)
        raise ArchMismatchError(
            f"these LoRAs are for different base models and cannot be used together: {listing}"
        )
    return archs.pop() if archs else None


def describe(lora: LoraFile) -> dict:
    """A plain summary for ``inspect``: what the file is and what it adapts."""
    ranks = [m.rank for m in lora.modules.values()]
    alphas = sorted({m.alpha for m in lora.modules.values()})
    return {
        "name": lora.name,
        "format": lora.format,
        "arch": lora.arch,
        "module_kinds": dict(Counter(m.kind for m in lora.modules.values())),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "layers": dict(Counter(m.component for m in lora.modules.values())),
        "has_text_encoder": any(m.component != "unet" for m in lora.modules.values()),
        "triggers": list(lora.triggers),
    }


def peek_lora(path: str) -> dict:
    """Architecture and trigger words from a .safetensors header, without reading the tensors.

    For LoRA lists in the WebUI, which show dozens of files at once. arch is None when neither
    the metadata nor the key names and the cross-attention input width tell.
    """
    _safetensors_header_size(path, os.path.basename(path))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        arch = _arch_from_metadata(metadata)
        if arch is None:
            keys = list(handle.keys())
            if any(k.startswith("lora_te2_") or "text_encoder_2" in k for k in keys):
                arch = "sdxl"
            else:
                down = [k for k in keys if "attn2" in k and ("to_k" in k or "to_v" in k) and ("lora_down" in k or "lora_A" in k)]
                if down:
                    arch = CONTEXT_WIDTH_ARCH.get(handle.get_slice(down[0]).get_shape()[-1])
    return {"arch": arch, "triggers": _triggers(path, metadata)}
