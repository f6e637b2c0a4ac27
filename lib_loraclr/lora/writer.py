"""Write kohya-format LoRA files (and A1111 sidecars) that every host can load.

Deltas (dense, or as factors) are factorised by SVD the way kohya's ``svd_merge_lora.py``
does (rank by request or by kept energy, values clamped at a quantile). The file has one alpha (the largest
rank) and each layer's up factor is pre-divided by alpha/rank, so every host's
``alpha / rank * up @ down`` gives back the factorised delta. Writes are atomic: a temp file
in the target folder, then os.replace.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence

import safetensors.torch
import torch

from .base import LoraFile, LoraFormatError, sidecar_path
from .keys import kohya_key
from .lowrank import LowRank
from .modules import LoraUpDown
from .reader import read_lora

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
SIDECAR_SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
LORA_SUFFIX = ".safetensors"


# A file name we write: starts with a letter, digit or "_", ends with one or ")", and holds only
# those, spaces and a few punctuation marks: no path separators, control characters, bidi
# overrides or trailing dots/spaces that Windows would silently strip.
_SAFE_NAME = re.compile(r"\w(?:[\w .()\[\]+,=@&'!~#-]*[\w)\]])?")
_WINDOWS_RESERVED = re.compile(r"(con|prn|aux|nul|com\d|lpt\d)(\..*)?", re.IGNORECASE)
MAX_NAME_CHARS = 200


def check_file_name(name: str, what: str = "output file name") -> None:
    """Refuse a file name (no folder part) that is unsafe or too long to write on common file systems."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name or _WINDOWS_RESERVED.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits, spaces and _ - . ( ) [ ] + , = @ & ' ! ~ #, "
            "starting with a letter or digit (no '/', '\\', '..', control or invisible characters)"
        )
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > 255:
        raise ValueError(f"invalid {what} {name[:40]!r}...: at most {MAX_NAME_CHARS} characters")


def safe_output_path(folder: str, name: str) -> str:
    """``folder/name.safetensors`` for a user-given file name; no path tricks allowed."""
    stripped = name.strip()
    if not stripped.endswith(LORA_SUFFIX):
        stripped += LORA_SUFFIX
    check_file_name(stripped[: -len(LORA_SUFFIX)])
    return os.path.join(folder, stripped)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _check_writable(folder: str, role: str) -> None:
    """A real write test: permission bits do not tell for root, read-only mounts or ACLs."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".loraclr-probe-", dir=folder)
    except OSError as error:
        raise PermissionError(f"cannot write the {role} into {folder}: {error.strerror or error}") from None
    os.close(fd)
    os.remove(probe)


def check_output_files(outputs: Mapping[str, str], overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Everything ``write_files`` needs, checked before any work: ``outputs`` (role -> path) have
    safe names, existing writable folders, no existing file unless ``overwrite``, and none is
    another output or one of ``inputs`` (files the job reads: never replaced, even with
    ``overwrite``)."""
    for role, path in outputs.items():
        check_file_name(os.path.basename(path), f"{role} file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{role} folder {folder} does not exist")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{role} {path} is a folder")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
        _check_writable(folder, role)
    items = list(outputs.items())
    for i, (role, path) in enumerate(items):
        for other_role, other in items[:i]:
            if _same_file(path, other):
                raise ValueError(f"the {role} {path} and the {other_role} are the same file; give them different names")
        for source in inputs:
            if _same_file(path, source):
                raise ValueError(f"the {role} {path} is one of the inputs ({os.path.basename(source)}), which are "
                                 "never replaced, even with overwriting allowed: choose another name")


def _write_temp(path: str, data: bytes) -> str:
    """``data`` in a new temp file beside ``path`` (same file system, so it can be renamed in)."""
    fd, temp_path = tempfile.mkstemp(prefix=".loraclr-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp_path, 0o644)  # mkstemp makes 0600; a LoRA file is an ordinary shared file
    except BaseException:
        os.remove(temp_path)
        raise
    return temp_path


def _quiet_remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_files(contents: dict[str, bytes], overwrite: bool) -> None:
    """Write several files all-or-nothing: every one is staged in a temp file, then they are
    renamed in; if anything fails (or Ctrl-C), files already renamed in are taken out again and
    the files they replaced put back. Errors name the real file, never a temp file."""
    staged: list[tuple[str, str]] = []  # (path, temp)
    done: list[tuple[str, str | None]] = []  # (path, backup of the file it replaced)
    current = ""
    try:
        for path in contents:
            current = path
            if os.path.lexists(path) and not overwrite:
                raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a folder")
        for path, data in contents.items():
            current = path
            staged.append((path, _write_temp(path, data)))
        for path, temp in staged:
            current = path
            backup = None
            if os.path.lexists(path):
                backup = temp + ".old"
                os.replace(path, backup)
            done.append((path, backup))
            os.replace(temp, path)
    except BaseException as error:
        for path, backup in reversed(done):
            if backup is None:
                _quiet_remove(path)
            else:
                os.replace(backup, path)
        for _, temp in staged:
            _quiet_remove(temp)
        if isinstance(error, OSError) and not isinstance(error, FileExistsError | IsADirectoryError):
            raise OSError(f"cannot write {current}: {error.strerror or error}") from None
        raise
    for _, backup in done:
        if backup is not None:
            _quiet_remove(backup)


def atomic_write(path: str, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder; never leave a partial file."""
    write_files({path: data}, overwrite)


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya sd-scripts computes them.

    Both hash the file kohya would write with only its ``ss_`` metadata: the model hash is
    sha256 of everything after the header (the tensor bytes), the legacy hash sha256 of the
    64 KiB at offset 1 MiB, first 8 hex digits.
    """
    data = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values."""
    squared = singular_values.square()
    kept = torch.cumsum(squared, 0) / squared.sum()
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1


def _clamp_value(values: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of |values| (kthvalue has no size limit, unlike torch.quantile)."""
    flat = values.abs().flatten()
    k = max(1, min(flat.numel(), round(quantile * flat.numel())))
    return float(torch.kthvalue(flat, k).values)


def factorize(
    delta: torch.Tensor | LowRank,
    rank: int | None,
    energy: float,
    max_rank: int,
    clamp_quantile: float | None,
    weight_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in[, kh, kw]) or its factors -> fp32 (up, down) with up @ down ~ delta.

    Linear: up (out, r), down (r, in). Conv: up (out, r, 1, 1), down (r, in, kh, kw);
    ``weight_shape`` gives the kernel for a ``LowRank`` in matrix form.
    """
    if isinstance(delta, LowRank):
        u, s, vh = delta.to(torch.float32).svd()
        shape = tuple(weight_shape or delta.shape)
    else:
        matrix = delta.detach().to(torch.float32).flatten(1)  # (out, in*kh*kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        shape = tuple(delta.shape)
    limit = min(max_rank, u.shape[0], vh.shape[1], s.numel())
    new_rank = max(1, min(rank if rank is not None else _energy_rank(s, energy), limit))
    up = u[:, :new_rank] * s[:new_rank]  # (out, r)
    down = vh[:new_rank]  # (r, in*kh*kw)
    if clamp_quantile is not None:
        bound = _clamp_value(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    if len(shape) == 4:
        up = up.reshape(up.shape[0], new_rank, 1, 1)
        down = down.reshape(new_rank, *shape[1:])
    return up.contiguous(), down.contiguous()


def frobenius(delta: LowRank) -> float:
    """||up @ down||_F without forming it."""
    up, down = delta.up.double(), delta.down.double()
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt())


def _as_strings(metadata: dict) -> dict[str, str]:
    """safetensors metadata holds strings only; anything else is stored as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


class KohyaWriter:
    """Factorises merged deltas layer by layer as they are solved, writes one kohya file at the end.

    Each ``add`` keeps only the layer's truncated factors (fp32 until ``seal``), so a merge
    never holds all its dense deltas. ``seal`` fixes the file's one alpha (the largest rank)
    and the stored precision; ``stored(target)`` is then the delta exactly as the file holds
    it (for measuring), and ``save`` writes the file atomically.
    ``rank`` applies to linear and 1x1 conv layers, ``conv_rank`` (default: ``rank``) to
    larger kernels; None picks per layer the smallest rank keeping ``energy``. All-zero
    deltas are skipped. ``clamp_quantile=None`` disables clamping (exact at full rank).
    """

    def __init__(
        self,
        arch: str,
        *,
        rank: int | None = None,
        conv_rank: int | None = None,
        energy: float = 0.95,
        max_rank: int = 128,
        clamp_quantile: float | None = 0.99,
        dtype: torch.dtype = torch.float16,
    ):
        if arch not in BASE_MODEL_VERSION:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(BASE_MODEL_VERSION)}")
        self.arch = arch
        self.rank, self.conv_rank, self.energy, self.max_rank = rank, conv_rank, energy, max_rank
        self.clamp_quantile, self.dtype = clamp_quantile, dtype
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: dict[str, float] = {}
        self.skipped: list[str] = []
        self.alpha: int | None = None
        self._sealed_ranks: dict[str, int] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, target: str, delta: torch.Tensor | LowRank, weight_shape: tuple[int, ...] | None = None) -> None:
        """One layer's delta, dense (base weight shape) or as factors in matrix form (with ``weight_shape``)."""
        if self.alpha is not None:
            raise RuntimeError("the writer is sealed; no more layers can be added")
        low_rank = delta if isinstance(delta, LowRank) else None
        norm = frobenius(low_rank) if low_rank is not None else float(torch.linalg.vector_norm(delta.float()))
        if not math.isfinite(norm):
            raise ValueError(f"the merged delta of layer {target} is not finite (NaN or Inf): nothing was written")
        if norm == 0:
            self.skipped.append(target)
            return
        shape = tuple(weight_shape or (delta.shape if low_rank is None else low_rank.shape))
        is_spatial_conv = len(shape) == 4 and shape[2:] != (1, 1)
        layer_rank = (self.conv_rank if self.conv_rank is not None else self.rank) if is_spatial_conv else self.rank
        up, down = factorize(delta, layer_rank, self.energy, self.max_rank, self.clamp_quantile, shape)
        approx = LowRank(up.flatten(1), down.flatten(1))
        exact = low_rank if low_rank is not None else dense_as_factors(delta)
        self.errors[target] = frobenius(LowRank.cat([exact.to(torch.float32), approx.scaled(-1.0)])) / norm
        self.factors[target] = (up.cpu(), down.cpu())

    def seal(self) -> None:
        """Fix the alpha and the stored tensors; from here ``stored`` gives the deltas as written."""
        if not self.factors:
            raise LoraFormatError("nothing to write, every delta is zero")
        # One alpha for the whole file: diffusers ignores per-layer alphas of kohya files whose
        # ranks differ, so each layer's alpha/rank scale is folded into its up factor instead.
        self.alpha = max(down.shape[0] for _, down in self.factors.values())
        for target, (up, down) in self.factors.items():
            layer_rank = down.shape[0]
            name = kohya_key(target, self.arch)
            stored_up, stored_down = (up * (layer_rank / self.alpha)).to(self.dtype), down.to(self.dtype)
            for factor, exact in ((stored_up, up), (stored_down, down)):
                if not torch.isfinite(factor).all():
                    raise ValueError(
                        f"the merged delta of layer {target} does not fit {str(self.dtype).removeprefix('torch.')} "
                        f"(factor values up to {float(exact.abs().max()):.3g}): the input LoRAs' weights are too large; "
                        "nothing was written"
                    )
            self.tensors[f"{name}.lora_up.weight"] = stored_up
            self.tensors[f"{name}.lora_down.weight"] = stored_down
            self.tensors[f"{name}.alpha"] = torch.tensor(float(self.alpha), dtype=self.dtype)
        self._sealed_ranks = {target: down.shape[0] for target, (_, down) in self.factors.items()}
        self.factors = {}

    @property
    def ranks(self) -> dict[str, int]:
        if self.alpha is not None:
            return dict(self._sealed_ranks)
        return {target: down.shape[0] for target, (_, down) in self.factors.items()}

    def stored(self, target: str) -> LowRank | None:
        """The sealed delta of a target in matrix form (scale * up @ down), fp32; None if skipped."""
        if self.alpha is None:
            raise RuntimeError("seal the writer first")
        if target not in self._sealed_ranks:
            return None
        name = kohya_key(target, self.arch)
        up, down = self.tensors[f"{name}.lora_up.weight"], self.tensors[f"{name}.lora_down.weight"]
        scale = self.alpha / down.shape[0]
        return LowRank(up.float().flatten(1) * scale, down.float().flatten(1))

    def sealed_lora(self, name: str) -> LoraFile:
        """The sealed file as an in-memory LoRA, its modules holding the stored tensors (no copy)."""
        if self.alpha is None:
            raise RuntimeError("seal the writer first")
        modules = {}
        for target in self._sealed_ranks:
            key = kohya_key(target, self.arch)
            modules[target] = LoraUpDown(target, tensors={
                role: self.tensors[f"{key}.{role}"] for role in ("lora_up.weight", "lora_down.weight", "alpha")
            })
        return LoraFile(name, "kohya", self.arch, modules)

    def save(self, path: str, metadata: dict | None = None, overwrite: bool = False) -> dict:
        """Write the sealed file atomically; returns {"path", "ranks", "errors", "skipped", "model_hash"}."""
        data, info = self.encode(path, metadata)
        atomic_write(path, data, overwrite)
        return info

    def encode(self, path: str, metadata: dict | None = None) -> tuple[bytes, dict]:
        """The file ``save`` writes to ``path``, as bytes (to write with other files at once), and ``save``'s dict."""
        if self.alpha is None:
            self.seal()
        ranks = self.ranks
        distinct_ranks = set(ranks.values())
        dim = str(distinct_ranks.pop()) if len(distinct_ranks) == 1 else "Dynamic"
        file_metadata = _as_strings(metadata or {})
        file_metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": str(self.alpha),
            "ss_base_model_version": BASE_MODEL_VERSION[self.arch],
            "ss_v2": str(self.arch == "sd2"),
            "ss_output_name": os.path.splitext(os.path.basename(path))[0],
            "loraclr_arch": self.arch,
        })
        model_hash, legacy_hash = model_hashes(self.tensors, file_metadata)
        file_metadata["sshs_model_hash"] = model_hash
        file_metadata["sshs_legacy_hash"] = legacy_hash
        return safetensors.torch.save(self.tensors, file_metadata), {
            "path": path, "ranks": ranks, "errors": dict(self.errors), "skipped": list(self.skipped),
            "model_hash": model_hash,
        }


def dense_as_factors(delta: torch.Tensor) -> LowRank:
    """A dense delta as the trivial factor pair (I, delta), for exact differences with ``LowRank``s."""
    matrix = delta.detach().float().flatten(1)
    return LowRank(torch.eye(matrix.shape[0]), matrix)


def write_kohya_lora(
    path: str,
    deltas: dict[str, torch.Tensor | LowRank],
    arch: str,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Factorise deltas (canonical target -> tensor or factors) and write a kohya LoRA file.

    ``options`` are ``KohyaWriter``'s (rank, conv_rank, energy, max_rank, clamp_quantile,
    dtype). Errors are relative Frobenius errors of the truncated, clamped factors.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    writer = KohyaWriter(arch, **options)
    for target, delta in deltas.items():
        writer.add(target, delta)
    try:
        writer.seal()
    except LoraFormatError as error:
        raise LoraFormatError(f"{os.path.basename(path)}: {error}") from None
    return writer.save(path, metadata, overwrite)


def sidecar_bytes(
    activation_text: str, description: str | None = None, preferred_weight: float = 1.0, arch: str | None = None
) -> bytes:
    """A1111's ``<name>.json`` content: activation text, preferred weight, sd version."""
    content = {
        "description": description or "",
        "sd version": SIDECAR_SD_VERSION.get(arch, "Unknown"),
        "activation text": activation_text,
        "preferred weight": preferred_weight,
    }
    return json.dumps(content, indent=4, ensure_ascii=False).encode("utf-8")


def write_sidecar(
    path_of_lora: str,
    activation_text: str,
    description: str | None = None,
    preferred_weight: float = 1.0,
    overwrite: bool = False,
    arch: str | None = None,
) -> str:
    """Write A1111's ``<name>.json`` beside a LoRA (activation text, weight, sd version).

    ``arch`` None reads it from the LoRA file. Returns the sidecar path.
    """
    if arch is None:
        arch = read_lora(path_of_lora).arch
    sidecar = sidecar_path(path_of_lora)
    atomic_write(sidecar, sidecar_bytes(activation_text, description, preferred_weight, arch), overwrite)
    return sidecar
