"""``python -m lib_loraclr demo``: the whole merge on a built-in tiny model, no downloads.

It writes a tiny SD1-architecture base model (diffusers folder), three tiny concept LoRAs in
kohya format with A1111 sidecars, and the merged LoRA of every method, then prints the
quality table. The files are real: the printed ``merge`` command reruns the job with them.
"""

from __future__ import annotations

import os

import torch

from .hosts.diffusers import DiffusersModel, load_base
from .lora.writer import write_kohya_lora, write_sidecar
from .merge.objective import MergeSettings
from .merge.pipeline import load_concepts, merge_to_file
from .tiny import save_tiny_model

DEMO_CONCEPTS = (("red_fox", "zqx fox"), ("tin_robot", "vbk robot"), ("glass_vase", "plm vase"))
LORA_RANK = 4
CAPTURE_SIZE = 64
# the demo's distill is the quick one (the defaults before pair images): the defaults' 1800 steps
# with 8 images per concept and a composed pair take about 3x as long for the same demonstration
QUICK_DISTILL = {"distill_iters": 600, "distill_trajectories": 4, "distill_pair_trajectories": 0}


def fresh_folder(path: str) -> str:
    """``path`` if it does not exist yet, else ``path-2``, ``path-3``...: earlier runs are kept."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    os.makedirs(candidate)
    return candidate


def concept_deltas(model: DiffusersModel, seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on the attention layers of the text encoder and the UNet."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for target, module in model.targets().items():
        is_attention = any(part in target for part in (".self_attn.", ".attn1.", ".attn2."))
        if not is_attention or not isinstance(module, torch.nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        up = torch.randn(out_features, LORA_RANK, generator=generator)
        down = torch.randn(LORA_RANK, in_features, generator=generator)
        delta = up @ down
        # a visible but LoRA-sized change: 30% of the base weight's norm
        deltas[target] = delta * (0.3 * module.weight.detach().norm() / delta.norm())
    return deltas


def make_demo_loras(model: DiffusersModel, folder: str) -> list[str]:
    paths = []
    for seed, (name, trigger) in enumerate(DEMO_CONCEPTS, start=1):
        path = os.path.join(folder, f"{name}.safetensors")
        write_kohya_lora(path, concept_deltas(model, seed), model.arch, rank=LORA_RANK,
                         metadata={"ss_output_name": name})
        write_sidecar(path, trigger, description=f"demo concept LoRA '{name}'")
        paths.append(path)
    return paths


def run_demo(out_dir: str = "loraclr_demo", device: str = "cpu") -> dict:
    folder = fresh_folder(out_dir)
    base_dir = os.path.join(folder, "tiny_sd1_base")
    save_tiny_model(base_dir, "sd1", seed=0)
    model = load_base(base_dir, device=device)
    lora_paths = make_demo_loras(model, folder)
    concepts = load_concepts(lora_paths, [trigger for _, trigger in DEMO_CONCEPTS])
    print(f"tiny base model: {base_dir}")
    print("concept LoRAs:  " + ", ".join(f"{os.path.basename(p)} ({c.trigger!r})" for p, c in zip(lora_paths, concepts)))

    summaries = {}
    for method in ("sum", "svd", "lsq", "loraclr", "distill"):
        settings = MergeSettings(method=method, capture_size=CAPTURE_SIZE, **(QUICK_DISTILL if method == "distill" else {}))
        out_path = os.path.join(folder, f"merged_{method}.safetensors")
        summaries[method] = merge_to_file(model, concepts, settings, out_path,
                                          report_path=os.path.join(folder, f"merged_{method}.report.json"))
        quick = f" (quick: {', '.join(f'{k}={v}' for k, v in QUICK_DISTILL.items())})" if method == "distill" else ""
        print(f"\n== {method}{quick}: wrote {out_path} ({summaries[method]['layers']} layers)")
        print(summaries[method]["table"])

    print("\noverall retention / crosstalk per concept (1 / 0 is perfect):")
    header = f"{'method':<10}" + "".join(f" {name:>22}" for name, _ in DEMO_CONCEPTS)
    print(header)
    for method, summary in summaries.items():
        figures = summary["quality"][method]
        cells = "".join(
            f" {figures[name]['overall']['retention']:>10.3f} / {figures[name]['overall']['crosstalk']:<9.3f}"
            for name, _ in DEMO_CONCEPTS
        )
        print(f"{method:<10}{cells}")
    seconds = summaries["loraclr"]["seconds"]
    print("\nloraclr seconds per stage: " + ", ".join(f"{stage} {value:.2f}" for stage, value in seconds.items()))
    command = " ".join(
        ["python -m lib_loraclr merge --base", base_dir]
        + [f"--lora {p} --trigger '{t}'" for p, (_, t) in zip(lora_paths, DEMO_CONCEPTS)]
        + [f"--capture-size {CAPTURE_SIZE} --out", os.path.join(folder, "my_merge.safetensors")]
    )
    print(f"\nall files are in {folder}/; rerun the merge yourself with:\n  {command}")
    return summaries
