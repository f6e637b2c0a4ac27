"""Full-width random-weight SD1.5 / SDXL diffusers folders and community-coverage kohya LoRAs.

The merge's memory grows with layer widths (Grams are D_in^2 per concept), so only the real
SD1.5 / SDXL configs show whether a merge of many LoRAs fits; ``lib_loraclr.tiny`` has the
right layer names but widths of 32-64. No hub access: weights are random, drawn straight into
fp16 on a meta-built model (a default init of SDXL in fp32 would need ~13 GiB).

``width_scale`` < 1 (development only) shrinks every width, keeping depth, layer names and the
number of LoRA targets, so the benchmark's whole path can be run on a small machine.

Cache layout under ``<cache>/<arch>_<width>/``: ``model/`` (what ``load_base`` reads),
``targets.json`` (canonical target -> weight shape and norm) and ``loras/lora_XX.safetensors``
+ A1111 sidecars; each is written to a temporary name first, so a killed build is redone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import safetensors.torch
import torch
from torch import nn

from lib_loraclr.hosts.diffusers import DiffusersModel
from lib_loraclr.lora.keys import kohya_key
from lib_loraclr.lora.writer import BASE_MODEL_VERSION, atomic_write, write_sidecar
from lib_loraclr.tiny import CLIP_VOCAB_SIZE, TOKENIZER_DIR, _scheduler

CACHE_VERSION = 1  # bump when configs, init or LoRA layout change
LORA_RANK = 16
LORA_ALPHA = 8.0
LORA_RELATIVE_SIZE = (0.02, 0.05)  # ||delta|| / ||W0|| per layer, drawn uniformly
EMBEDDING_STD = 0.02  # CLIP's own init of token and position embeddings

# What kohya sd-scripts' networks.lora trains by default, as canonical target names.
COMMUNITY_TARGETS = re.compile(
    r"text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    r"|unet\..+\.attentions\.\d+\.(proj_in|proj_out)"
    r"|unet\..+\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
)


def _width(full: int, scale: float, multiple: int) -> int:
    """``full * scale`` rounded to a multiple of ``multiple`` (head count / norm groups), at least one multiple."""
    return max(multiple, round(full * scale / multiple) * multiple)


def model_configs(arch: str, scale: float = 1.0) -> dict:
    """Constructor kwargs of every component: SD1.5 / SDXL base, widths times ``scale``."""
    if arch not in ("sd1", "sdxl"):
        raise ValueError(f"full-width models exist for 'sd1' and 'sdxl', not {arch!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"width scale must be in (0, 1], got {scale}")
    unet_groups = 32 if scale == 1 else 16  # 16 keeps scaled widths divisible by SDXL's 5 heads
    vae_widths = tuple(_width(w, scale, 32) for w in (128, 256, 512, 512))
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_widths, layers_per_block=2, norm_num_groups=32,
        sample_size=512 if arch == "sd1" else 1024, scaling_factor=0.18215 if arch == "sd1" else 0.13025,
    )

    def clip(hidden, heads, layers, act, projection=None):
        hidden = _width(hidden, scale, heads)
        return dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            hidden_act=act, projection_dim=hidden if projection else 768,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )

    if arch == "sd1":
        heads = 8  # SD1's attention_head_dim is its head count
        text = clip(768, 12, 12, "quick_gelu")
        unet = dict(
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=tuple(_width(w, scale, math.lcm(unet_groups, heads)) for w in (320, 640, 1280, 1280)),
            layers_per_block=2, attention_head_dim=heads, cross_attention_dim=text["hidden_size"],
            norm_num_groups=unet_groups,
        )
        return {"unet": unet, "text_encoder": text, "vae": vae}
    text = clip(768, 12, 12, "quick_gelu")
    text_2 = clip(1280, 20, 32, "gelu", projection=True)
    heads = (5, 10, 20)
    time_embed_dim = _width(256, scale, 8)
    unet = dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(
            _width(w, scale, math.lcm(unet_groups, h)) for w, h in zip((320, 640, 1280), heads)
        ),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=heads,
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_2["projection_dim"],
        norm_num_groups=unet_groups,
    )
    return {"unet": unet, "text_encoder": text, "text_encoder_2": text_2, "vae": vae}


def _on_meta_fp16(build):
    """Build a module with fp16 parameters on the meta device: no memory, no default init."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def materialize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Allocate a meta-built module on the CPU and draw plausible weights.

    Linear / conv: N(0, 1/sqrt(fan_in)) and zero bias (unit gain per layer, like a default
    init); norms: weight 1, bias 0; embeddings: N(0, 0.02) as CLIP's init; CLIP position_ids:
    0..76 (a non-persistent buffer, but the build's target listing must not see garbage).
    """
    module.to_empty(device="cpu")
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            child.weight.normal_(0, child.weight[0].numel() ** -0.5, generator=generator)
            if child.bias is not None:
                child.bias.zero_()
        elif isinstance(child, (nn.LayerNorm, nn.GroupNorm)):
            if child.weight is not None:
                child.weight.fill_(1)
            if child.bias is not None:
                child.bias.zero_()
        elif isinstance(child, nn.Embedding):
            child.weight.normal_(0, EMBEDDING_STD, generator=generator)
        elif any(True for _ in child.parameters(recurse=False)):
            raise TypeError(f"no init rule for the parameters of {type(child).__name__}")
    for name, buffer in module.named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
        else:
            raise TypeError(f"no init rule for buffer {name}")
    return module.eval()


def build_components(arch: str, scale: float = 1.0, seed: int = 0) -> dict:
    """Random fp16 components of an SD1.5 / SDXL pipeline (widths times ``scale``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    configs = model_configs(arch, scale)
    generator = torch.Generator().manual_seed(seed)
    components = {
        "unet": materialize(_on_meta_fp16(lambda: UNet2DConditionModel(**configs["unet"])), generator),
        "text_encoder": materialize(
            _on_meta_fp16(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))), generator
        ),
        "vae": materialize(_on_meta_fp16(lambda: AutoencoderKL(**configs["vae"])), generator),
        "tokenizer": CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        "scheduler": _scheduler(),
    }
    if arch == "sdxl":
        components["text_encoder_2"] = materialize(
            _on_meta_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))),
            generator,
        )
        # SDXL's second tokenizer pads with "!" (id 0), as in lib_loraclr.tiny
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    return components


def community_targets(model: DiffusersModel) -> dict[str, dict]:
    """Canonical target -> {"shape", "norm"} of every layer kohya trains by default (norm None on meta)."""
    found = {}
    for target, module in model.targets().items():
        if COMMUNITY_TARGETS.fullmatch(target):
            weight = module.weight.detach()
            norm = None if weight.is_meta else float(weight.float().norm())
            found[target] = {"shape": list(weight.shape), "norm": norm}
    return found


def meta_targets(arch: str, scale: float = 1.0) -> dict[str, dict]:
    """The LoRA targets and their shapes without building any weights (for size figures)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    configs = model_configs(arch, scale)
    encoder_2 = None
    if arch == "sdxl":
        encoder_2 = _on_meta_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    model = DiffusersModel(
        _on_meta_fp16(lambda: UNet2DConditionModel(**configs["unet"])),
        _on_meta_fp16(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))),
        CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        _scheduler(),
        text_encoder_2=encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!") if encoder_2 is not None else None,
        vae=_on_meta_fp16(lambda: AutoencoderKL(**configs["vae"])),
    )
    return community_targets(model)


def cache_folder(cache: str, arch: str, scale: float) -> str:
    width = "full" if scale == 1 else f"w{scale:g}"
    return os.path.join(os.path.abspath(cache), f"{arch}_{width}_v{CACHE_VERSION}")


def ensure_model(cache: str, arch: str, scale: float = 1.0, log=print) -> tuple[str, dict, float | None]:
    """(model folder, targets, build seconds or None when cached); builds it the first time."""
    folder = cache_folder(cache, arch, scale)
    model_dir, targets_path = os.path.join(folder, "model"), os.path.join(folder, "targets.json")
    if os.path.isfile(os.path.join(model_dir, "model_index.json")) and os.path.isfile(targets_path):
        with open(targets_path, encoding="utf-8") as f:
            return model_dir, json.load(f), None
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    os.makedirs(folder, exist_ok=True)
    log(f"building a random {arch} model (width x{scale:g}) in {model_dir} ...")
    started = time.perf_counter()
    components = build_components(arch, scale)
    built = time.perf_counter()
    if arch == "sd1":
        pipeline = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipeline = StableDiffusionXLPipeline(**components)
    partial_dir = model_dir + ".partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    pipeline.save_pretrained(partial_dir, safe_serialization=True)
    saved = time.perf_counter()
    targets = community_targets(DiffusersModel.from_pipeline(pipeline))
    del pipeline, components
    os.replace(partial_dir, model_dir)
    atomic_write(targets_path, json.dumps(targets, indent=0).encode(), overwrite=True)
    seconds = time.perf_counter() - started
    log(f"  built in {seconds:.1f} s (init {built - started:.1f} s, save {saved - built:.1f} s), "
        f"{folder_bytes(model_dir) / 2 ** 30:.2f} GiB on disk, {len(targets)} LoRA targets")
    return model_dir, targets, seconds


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def trigger_of(index: int) -> str:
    """A unique rare-token trigger per LoRA, as a community LoRA's activation text."""
    return f"zqx{index + 1} person"


def lora_tensors(arch: str, targets: dict[str, dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya tensors of one rank-16 LoRA over ``targets``, each layer's delta 2-5% of ||W0||.

    down ~ N(0, 1/sqrt(D_in)) as a kaiming-like init; up random, scaled so that
    ||alpha/rank * up @ down||_F hits the drawn relative size (computed on rank x rank
    Grams, never on the dense delta).
    """
    scale = LORA_ALPHA / LORA_RANK
    tensors = {}
    for target, info in targets.items():
        d_out, d_in_channels, *kernel = info["shape"]
        d_in = d_in_channels * math.prod(kernel)
        down = torch.randn(LORA_RANK, d_in, generator=generator) / d_in ** 0.5
        up = torch.randn(d_out, LORA_RANK, generator=generator)
        delta_norm = scale * abs(float(torch.trace((up.T @ up) @ (down @ down.T)))) ** 0.5  # ||up @ down||_F
        low, high = LORA_RELATIVE_SIZE
        relative = low + (high - low) * float(torch.rand((), generator=generator))
        up *= relative * info["norm"] / delta_norm
        if kernel:  # 1x1 conv (SD1 proj_in / proj_out): kohya stores conv-shaped factors
            down = down.reshape(LORA_RANK, d_in_channels, *kernel)
            up = up.reshape(d_out, LORA_RANK, 1, 1)
        name = kohya_key(target, arch)
        tensors[f"{name}.lora_down.weight"] = down.to(torch.float16).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    return tensors


def ensure_loras(cache: str, arch: str, scale: float, targets: dict[str, dict], count: int, log=print) -> list[str]:
    """Paths of ``count`` LoRA files (with sidecars), writing the missing ones one at a time."""
    folder = os.path.join(cache_folder(cache, arch, scale), "loras")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"lora_{index:02d}.safetensors")
        paths.append(path)
        sidecar = os.path.splitext(path)[0] + ".json"
        if os.path.isfile(path) and os.path.isfile(sidecar):
            continue
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(1000 + index)
        tensors = lora_tensors(arch, targets, generator)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(LORA_RANK),
            "ss_network_alpha": str(LORA_ALPHA),
            "ss_base_model_version": BASE_MODEL_VERSION[arch],
            "ss_output_name": os.path.splitext(os.path.basename(path))[0],
        }
        atomic_write(path, safetensors.torch.save(tensors, metadata), overwrite=True)
        write_sidecar(path, trigger_of(index), description="random community-coverage LoRA (bench)",
                      overwrite=True, arch=arch)
        log(f"  wrote {path} ({len(tensors) // 3} layers, {os.path.getsize(path) / 2 ** 20:.1f} MiB, "
            f"{time.perf_counter() - started:.1f} s)")
        del tensors
    return paths


def old_design_bytes(targets: dict[str, dict], n_concepts: int) -> int:
    """What the previous merge engine held at once: per target an (N, D_in, D_in) float64 Gram
    plus a dense fp32 delta per concept (conv: D_in = in * kh * kw)."""
    total = 0
    for info in targets.values():
        d_out, *rest = info["shape"]
        d_in = math.prod(rest)
        total += n_concepts * d_in * d_in * 8 + n_concepts * d_out * d_in * 4
    return total


def unet_rows_per_image(target: str, arch: str, size: int) -> int:
    """Tokens a UNet transformer layer sees per image at ``size`` px: the latent (size / 8) halved per level."""
    levels = 3 if arch == "sdxl" else 4
    parts = target.split(".")
    if parts[1] == "mid_block":
        level = levels - 1
    else:
        index = int(parts[2])
        level = index if parts[1] == "down_blocks" else levels - 1 - index
    return (size // 8 // 2 ** level) ** 2


def planned_batches(targets: dict[str, dict], arch: str, n_concepts: int, size: int, budget: int | None = None) -> tuple[float, list[range]]:
    """(GiB of one concept's estimated UNet activations, the concept batches) the engine plans at ``size`` px."""
    import torch

    from lib_loraclr.merge.engine import stage_of_target
    from lib_loraclr.merge.memory import DEFAULT_CAP, activation_bytes, concept_batches

    class Layer:
        def __init__(self, shape):
            self.weight = torch.empty(shape, device="meta")

    layers = {t: Layer(info["shape"]) for t, info in targets.items() if stage_of_target(t) == "unet"}
    rows = {t: unet_rows_per_image(t, arch, size) for t in layers}
    per_concept = activation_bytes(layers, rows)
    return per_concept / 2 ** 30, concept_batches(n_concepts, per_concept, budget or DEFAULT_CAP)


def planned_statistics(targets: dict[str, dict], n_concepts: int, rank: int = 16, budget: int | None = None) -> dict:
    """What the streaming engine plans per stage: text rows as the capture has them (2 prompts x 77 tokens,
    a few trigger rows for k/v), UNet rows worst case (every input folded into its factor, as at 512-1024 px).

    Returns {stage: (GiB held if the whole stage were one pass, passes within ``budget``)}.
    """
    import torch

    from lib_loraclr.merge.engine import stage_of_target
    from lib_loraclr.merge.memory import DEFAULT_CAP, plan_passes, stream_costs

    class Layer:  # what the planner reads of a module: its weight's shape
        def __init__(self, shape):
            self.weight = torch.empty(shape, device="meta")

    plan = {}
    for stage in ("text_encoder", "cross_kv", "unet"):
        layers = {t: Layer(info["shape"]) for t, info in targets.items() if stage_of_target(t) == stage}
        if not layers:
            continue
        rows = {"text_encoder": 2 * 77, "cross_kv": 16, "unet": None}[stage]
        costs = stream_costs(layers, dict.fromkeys(layers, n_concepts * rank), n_concepts,
                             None if rows is None else dict.fromkeys(layers, rows))
        held = sum(c.nbytes for c in costs) + max(c.fold_bytes for c in costs)
        plan[stage] = (held / 2 ** 30, len(plan_passes(costs, budget or DEFAULT_CAP)))
    return plan
