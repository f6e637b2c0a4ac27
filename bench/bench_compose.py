"""Composition cost: CLoRA (our engine vs the authors' way), the single-pass mode, plain stacking.

All three use one random-weight SD1-layout model (tiny by default; ``--widths`` and
``--size`` scale it up), the same prompt, seed, sampler and schedule, and 2 subject LoRAs:
  (a) ours: passes batched into one UNet call, loss passes truncated after the last
      attention layer they read;
  (b) the authors' way: one full UNet run per pass, backward through all of them;
  (c) plain sampling with both LoRAs stacked (no CLoRA);
  (d) the single-pass mode ("masked"): one UNet evaluation per step;
then (e) plain stacking and (f) the single-pass mode with 4 subject LoRAs. The targets are
(d)/(c) <= 1.3 and (f)/(e) <= 1.6 (and CLoRA (a)/(b) <= 0.5).
(a) and (b) compute the same thing, so their images must agree to float tolerance. Timings
and memory are taken in float32. At the paper's settings (step size 20, 20 refinement
iterations) the latent update map of a random-weight model is expansive, so rounding
differences between batched and separate passes grow over the 60+ updates; (a) and (b) are
therefore also run with the model in float64 (the library still keeps the sampler state,
predictions, attention maps and loss in float32, so float32 rounding is not fully removed).

    python bench/bench_compose.py [--quick] [--device cuda] [--widths 320,640,1280,1280] [--size 512] [--no-float64]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_solvers import PeakMemory, timed  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from lib_loraclr.compose.concepts import LoraConcept  # noqa: E402
from lib_loraclr.compose.pipeline import CLoRAPipeline  # noqa: E402
from lib_loraclr.compose.settings import ComposeSettings  # noqa: E402
from lib_loraclr.hosts.diffusers import DiffusersModel  # noqa: E402
from lib_loraclr.lora.base import LoraFile  # noqa: E402
from lib_loraclr.lora.modules import LoraUpDown  # noqa: E402
from lib_loraclr.runtime import LoraRuntime  # noqa: E402
from lib_loraclr.sampling import decode_latents, sample  # noqa: E402
from lib_loraclr.tiny import TEXT_HIDDEN_SD1, build_tiny_components  # noqa: E402

PROMPT = "a cat and a dog"
STACKED_PROMPT = "a sks cat and a zqx dog"
CONCEPTS = [LoraConcept("cat", "sks"), LoraConcept("dog", "zqx")]
PROMPT_4 = "a cat and a dog and a bird and a fish"
STACKED_PROMPT_4 = "a sks cat and a zqx dog and a vbn bird and a qwp fish"
CONCEPTS_4 = CONCEPTS + [LoraConcept("bird", "vbn"), LoraConcept("fish", "qwp")]
LORA_RANK = 8


def build_model(widths: tuple[int, ...] | None, device: torch.device) -> DiffusersModel:
    """The tiny SD1 model, its UNet optionally rebuilt with other block widths (random weights)."""
    components = build_tiny_components("sd1", seed=0)
    if widths is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            components["unet"] = UNet2DConditionModel(
                sample_size=64,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=widths,
                layers_per_block=2,
                attention_head_dim=8,
                cross_attention_dim=TEXT_HIDDEN_SD1,
                norm_num_groups=32 if all(w % 32 == 0 for w in widths) else 8,
            ).eval()
    model = DiffusersModel(components["unet"], components["text_encoder"], components["tokenizer"],
                           components["scheduler"], vae=components["vae"])
    for module in (model.unet, model.text_encoder, model.vae):
        module.to(device)
    return model


def random_lora(model: DiffusersModel, seed: int) -> LoraFile:
    """A rank-8 LoRA on every attention projection of the UNet and text encoder, in memory."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for target, module in model.targets().items():
        if not isinstance(module, torch.nn.Linear) or not any(p in target for p in (".attn1.", ".attn2.", ".self_attn.")):
            continue
        out_features, in_features = module.weight.shape
        down = torch.randn(LORA_RANK, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, LORA_RANK, generator=generator) * (0.3 * float(module.weight.detach().norm()) / out_features**0.5)
        modules[target] = LoraUpDown(target, {"lora_up.weight": up, "lora_down.weight": down})
    return LoraFile(f"bench_lora_{seed}.safetensors", "kohya", "sd1", modules)


def run_clora(model, loras, settings, args, mode, decode=True):
    pipeline = CLoRAPipeline(model)
    prompt, concepts = (PROMPT, CONCEPTS) if len(loras) == 2 else (PROMPT_4, CONCEPTS_4)
    return pipeline(prompt, concepts, loras, steps=args.steps, seed=0, height=args.size, width=args.size,
                    settings=settings, mode=mode, decode=decode)


@torch.no_grad()
def run_stacked(model, loras, settings, args):
    with LoraRuntime(model.targets(), loras):
        cond, uncond = model.encode([STACKED_PROMPT if len(loras) == 2 else STACKED_PROMPT_4]), model.encode([""])
        latents = sample(model, cond, steps=args.steps, height=args.size, width=args.size, seed=0,
                         uncond=uncond, guidance_scale=settings.guidance_scale)
    return decode_latents(model.vae, latents)


@torch.no_grad()
def float_image(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) decoded image in [0, 1] at the VAE's precision, before 8-bit rounding."""
    sample = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (sample / 2 + 0.5).clamp(0, 1)


def mode_differences(model, loras, settings, args) -> tuple[float, float]:
    """max |latent (a) - latent (b)| and max |image (a) - image (b)| (image in [0, 1], not rounded)."""
    fast, authors = (run_clora(model, loras, settings, args, mode, decode=False) for mode in ("fast", "authors"))
    latent_difference = (fast.latents - authors.latents).abs().max()
    image_difference = (float_image(model.vae, fast.latents) - float_image(model.vae, authors.latents)).abs().max()
    return float(latent_difference), float(image_difference)


def image_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 steps instead of 20")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", help="UNet block widths, e.g. 320,640,1280,1280 (SD1.5); default: the tiny model")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--divisor", type=int, default=32, help="attention_res_divisor")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 (a)/(b) equivalence run")
    parser.add_argument("--single-pass-only", action="store_true",
                        help="only (c)-(f): the single-pass mode against plain stacking (fast at full width)")
    args = parser.parse_args()
    args.steps = args.steps or (8 if args.quick else 20)
    device = torch.device(args.device)
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    model = build_model(widths, device)
    loras = [random_lora(model, seed) for seed in (1, 2)]
    settings = ComposeSettings(method="clora", attention_res_divisor=args.divisor)
    unet_params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    print(f"device {device}, UNet {unet_params:.1f}M params, {args.size}px, {args.steps} steps, 2 LoRAs, "
          f"updates at steps < {settings.alter_until(args.steps)}, refinement steps "
          f"{settings.refinement_steps_for(args.steps)} x{settings.refinement_iters}")

    quick_args = argparse.Namespace(**{**vars(args), "steps": 1})
    masked = replace(settings, method="masked")
    run_clora(model, loras, masked if args.single_pass_only else settings, quick_args, "fast")  # warm-up

    rows = {}
    results = {}
    loras_4 = loras + [random_lora(model, seed) for seed in (3, 4)]
    runs = [
        ("(c) stacked, plain", lambda: run_stacked(model, loras, settings, args)),
        ("(d) single pass", lambda: run_clora(model, loras, masked, args, "fast")),
        ("(e) stacked, 4 LoRAs", lambda: run_stacked(model, loras_4, settings, args)),
        ("(f) single pass, 4", lambda: run_clora(model, loras_4, masked, args, "fast")),
    ]
    if not args.single_pass_only:
        runs = [("(a) ours", lambda: run_clora(model, loras, settings, args, "fast")),
                ("(b) authors' way", lambda: run_clora(model, loras, settings, args, "authors"))] + runs
    for name, run in runs:
        with PeakMemory(device) as memory:
            result, seconds, cpu_seconds = timed(device, run)
        results[name] = result
        rows[name] = (seconds, cpu_seconds, memory.mib)
        print(f"{name:<20} {seconds:8.2f} s/image  {cpu_seconds:8.2f} CPU s  peak +{memory.mib:8.1f} MiB", flush=True)

    (c_s, c_cpu, c_mem), (d_s, d_cpu, d_mem), (e_s, e_cpu, e_mem), (f_s, f_cpu, f_mem) = list(rows.values())[-4:]
    print(f"(d)/(c): time {d_s / c_s:.2f}x (CPU {d_cpu / c_cpu:.2f}x), peak memory {d_mem / max(c_mem, 1e-9):.2f}x"
          "  [target <= 1.3x]")
    print(f"(f)/(e): time {f_s / e_s:.2f}x (CPU {f_cpu / e_cpu:.2f}x), peak memory {f_mem / max(e_mem, 1e-9):.2f}x"
          "  [target <= 1.6x]")
    if args.single_pass_only:
        return 0
    (a_s, a_cpu, a_mem), (b_s, b_cpu, b_mem) = list(rows.values())[:2]
    fast, authors = results["(a) ours"], results["(b) authors' way"]
    difference = (image_tensor(fast.images[0]) - image_tensor(authors.images[0])).abs().max()
    print(f"(a)/(b): time {a_s / b_s:.2f}x (CPU {a_cpu / b_cpu:.2f}x), peak memory {a_mem / max(b_mem, 1e-9):.2f}x")
    print(f"(a)/(c): time {a_s / c_s:.2f}x (CPU {a_cpu / c_cpu:.2f}x), peak memory {a_mem / max(c_mem, 1e-9):.2f}x")
    print(f"max |image (a) - image (b)| = {float(difference):.3g} (of 1.0; 8-bit step 0.0039)")
    float32_latent = float((fast.latents - authors.latents).abs().max())
    float32_image = float((float_image(model.vae, fast.latents) - float_image(model.vae, authors.latents)).abs().max())
    print(f"{'(a) vs (b)':<10} {'max |latent diff|':>18} {'max |image diff|':>17}  (image in [0, 1], before 8-bit rounding)")
    print(f"{'float32':<10} {float32_latent:18.3g} {float32_image:17.3g}")
    if not args.no_float64:
        # The library keeps the sampler state, predictions, attention maps and loss in float32
        # whatever the model's dtype, so this measures a float64 UNet/VAE/text encoder with those casts.
        model64 = build_model(widths, device)
        for module in (model64.unet, model64.text_encoder, model64.vae):
            module.to(torch.float64)
        latent64, image64 = mode_differences(model64, loras, settings, args)
        print(f"{'float64':<10} {latent64:18.3g} {image64:17.3g}  (float64 model)", flush=True)

    # Many repeated step-20 updates on a random-weight model amplify float rounding (the
    # update map is expansive there), so also compare without the refinement repeats.
    plain = replace(settings, refinement_iters=0)
    fast, authors = (run_clora(model, loras, plain, args, mode) for mode in ("fast", "authors"))
    print(f"without refinement repeats: max |latent (a) - latent (b)| = "
          f"{float((fast.latents - authors.latents).abs().max()):.3g}, max |image diff| = "
          f"{float((image_tensor(fast.images[0]) - image_tensor(authors.images[0])).abs().max()):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
