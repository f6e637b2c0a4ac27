"""Write kohya-format LoRA files (and A1111 sidecars) that every host can load.

Dense deltas are factorised by SVD the way kohya's ``svd_merge_lora.py`` does (rank by
request or by kept energy, values clamped at a quantile). The file has one alpha (the largest
rank) and each layer's up factor is pre-divided by alpha/rank, so every host's
``alpha / rank * up @ down`` gives back the factorised delta. Writes are atomic: a temp file
in the target folder, then os.replace.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import safetensors.torch
import torch

from .base import LoraFormatError, sidecar_path
from .keys import kohya_key
from .reader import read_lora

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
SIDECAR_SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
LORA_SUFFIX = ".safetensors"


def safe_output_path(folder: str, name: str) -> str:
    """``folder/name.safetensors`` for a user-given file name; no path tricks allowed."""
    stripped = name.strip()
    if not stripped or "/" in stripped or "\\" in stripped or ".." in stripped or "\0" in stripped:
        raise ValueError(f"invalid output file name {name!r}: give a plain name without '/', '\\' or '..'")
    if not stripped.endswith(LORA_SUFFIX):
        stripped += LORA_SUFFIX
    return os.path.join(folder, stripped)


def atomic_write(path: str, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder; never leave a partial file."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(prefix=".loraclr-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp_path, 0o644)  # mkstemp makes 0600; a LoRA file is an ordinary shared file
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


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
    delta: torch.Tensor, rank: int | None, energy: float, max_rank: int, clamp_quantile: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (out, in[, kh, kw]) -> fp32 (up, down) with up @ down ~ delta.

    Linear: up (out, r), down (r, in). Conv: up (out, r, 1, 1), down (r, in, kh, kw).
    """
    matrix = delta.detach().to(torch.float32).flatten(1)  # (out, in*kh*kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    limit = min(max_rank, *matrix.shape)
    new_rank = min(rank if rank is not None else _energy_rank(s, energy), limit)
    up = u[:, :new_rank] * s[:new_rank]  # (out, r)
    down = vh[:new_rank]  # (r, in*kh*kw)
    if clamp_quantile is not None:
        bound = _clamp_value(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    if delta.dim() == 4:
        up = up.reshape(up.shape[0], new_rank, 1, 1)
        down = down.reshape(new_rank, *delta.shape[1:])
    return up.contiguous(), down.contiguous()


def _as_strings(metadata: dict) -> dict[str, str]:
    """safetensors metadata holds strings only; anything else is stored as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def write_kohya_lora(
    path: str,
    deltas: dict[str, torch.Tensor],
    arch: str,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    energy: float = 0.95,
    max_rank: int = 128,
    clamp_quantile: float | None = 0.99,
    metadata: dict | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float16,
    metadata_from_written=None,
) -> dict:
    """Factorise dense deltas (canonical target -> tensor) and write a kohya LoRA file.

    ``rank`` applies to linear and 1x1 conv layers, ``conv_rank`` (default: ``rank``) to
    larger kernels; None picks per layer the smallest rank keeping ``energy``. All-zero
    deltas are skipped. ``clamp_quantile=None`` disables clamping (exact at full rank).
    ``dtype`` is the stored precision; errors are measured on the stored factors.
    ``metadata_from_written(deltas) -> dict`` sees the deltas exactly as stored (up @ down)
    before the file is written, so figures measured on them can go into its metadata.
    Returns {"path", "ranks": {target: r}, "errors": {target: relative Frobenius error},
    "skipped": [targets], "model_hash"}.
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(BASE_MODEL_VERSION)}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    skipped: list[str] = []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, delta in deltas.items():
        if not torch.any(delta):
            skipped.append(target)
            continue
        is_spatial_conv = delta.dim() == 4 and delta.shape[2:] != (1, 1)
        layer_rank = (conv_rank if conv_rank is not None else rank) if is_spatial_conv else rank
        factors[target] = factorize(delta, layer_rank, energy, max_rank, clamp_quantile)
    if not factors:
        raise LoraFormatError(f"{os.path.basename(path)}: nothing to write, every delta is zero")

    # One alpha for the whole file: diffusers ignores per-layer alphas of kohya files whose
    # ranks differ, so each layer's alpha/rank scale is folded into its up factor instead.
    alpha = max(down.shape[0] for _, down in factors.values())
    written: dict[str, torch.Tensor] = {}  # target -> the delta as stored (scale * up @ down)
    for target, (up, down) in factors.items():
        layer_rank = down.shape[0]
        up, down = (up * (layer_rank / alpha)).to(dtype), down.to(dtype)
        matrix = deltas[target].detach().float().flatten(1)
        approx = (alpha / layer_rank) * (up.float().flatten(1) @ down.float().flatten(1))
        errors[target] = float(torch.linalg.matrix_norm(matrix - approx) / torch.linalg.matrix_norm(matrix))
        written[target] = approx.reshape(deltas[target].shape)
        name = kohya_key(target, arch)
        ranks[target] = layer_rank
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)

    distinct_ranks = set(ranks.values())
    dim = str(distinct_ranks.pop()) if len(distinct_ranks) == 1 else "Dynamic"
    file_metadata = _as_strings(metadata or {})
    file_metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "ss_output_name": os.path.splitext(os.path.basename(path))[0],
        "loraclr_arch": arch,
    })
    if metadata_from_written is not None:
        file_metadata.update(_as_strings(metadata_from_written(written)))
    model_hash, legacy_hash = model_hashes(tensors, file_metadata)
    file_metadata["sshs_model_hash"] = model_hash
    file_metadata["sshs_legacy_hash"] = legacy_hash
    atomic_write(path, safetensors.torch.save(tensors, file_metadata), overwrite)
    return {"path": path, "ranks": ranks, "errors": errors, "skipped": skipped, "model_hash": model_hash}


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
    content = {
        "description": description or "",
        "sd version": SIDECAR_SD_VERSION.get(arch, "Unknown"),
        "activation text": activation_text,
        "preferred weight": preferred_weight,
    }
    atomic_write(sidecar, json.dumps(content, indent=4, ensure_ascii=False).encode("utf-8"), overwrite)
    return sidecar
