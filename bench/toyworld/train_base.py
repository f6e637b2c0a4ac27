"""Train the toy world's base model from scratch, then measure how often it draws what it is asked.

    python -m bench.toyworld.train_base [--steps 4000] [--batch 24] [--device cpu] [--workers 0] [--out bench/toyworld/assets/base]

Data: an endless stream of random scenes (1-3 objects, ``world.base_example``), example k of
the stream drawn from seed ``--seed * 10**7 + k``. Unweighted v-prediction loss (as SD 2),
10% empty captions (for classifier-free guidance), AdamW with warm-up and cosine decay, an
EMA of the weights (that is what is saved). Text encoder and UNet are trained together; the VAE is fitted to the fixed pixel-space transform afterwards. Everything is seeded.
Weights are written as fp16 safetensors in a diffusers folder (``load_base`` reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch

from .model import FACTOR, build_components, images_to_pixels, images_to_tensor, save_pipeline
from .world import base_example

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "assets", "base")
EVAL_SEED_OFFSET = 900_000_000  # evaluation scenes never appear in training


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def diffusion_loss(unet, text_encoder, ids, clean, alphas_cumprod, generator, pixel_weights=None):
    """V-prediction loss of one batch, unweighted as SD 2 trains (clean: (B, C, H, W) latents).

    pixel_weights: optional (B, H*4, W*4) weights of the image's pixels; the latent is the exact
    space-to-depth of the pixels, so its squared error maps back to them (``pixel_shuffle``).
    """
    batch = clean.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator).to(clean.device)
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    a = alphas_cumprod.to(clean.device)[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
    context = text_encoder(ids.to(clean.device)).last_hidden_state
    velocity = unet(noisy, t, encoder_hidden_states=context).sample
    target = a.sqrt() * noise - (1 - a).sqrt() * clean
    if pixel_weights is None:
        return (velocity - target).square().mean()
    error = torch.nn.functional.pixel_shuffle((velocity - target).square(), FACTOR)  # (B, 3, H, W)
    weights = pixel_weights.to(clean.device)[:, None]
    return (error * weights).mean() / weights.mean()


class Batches(torch.utils.data.Dataset):
    """Batch k: examples ``seed * 10**7 + k * batch + i`` and their token ids, 10% of captions
    emptied (from the example's own seed, so the stream is the same with any number of workers)."""

    def __init__(self, tokenizer, seed: int, batch: int, steps: int):
        self.tokenizer, self.seed, self.batch, self.steps = tokenizer, seed, batch, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        first = self.seed * 10**7 + step * self.batch
        examples = [base_example(first + i) for i in range(self.batch)]
        captions = [e[1] if np.random.default_rng([first + i, 1]).random() >= 0.1 else ""
                    for i, e in enumerate(examples)]
        clean = images_to_tensor(np.stack([e[0] for e in examples]))
        return clean, token_ids(self.tokenizer, captions)


class Ema:
    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, decay: float | None = None):
        d = self.decay if decay is None else decay
        for name, module in modules.items():
            for p_ema, p in zip(self.shadow[name].parameters(), module.parameters()):
                p_ema.lerp_(p, 1 - d)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, device, seed: int, steps: int = 150, batch: int = 16) -> float:
    """Fit the VAE to space-to-depth (encoder) and its inverse (decoder) on toy scenes; returns its final mean absolute error (0-255)."""
    generator = torch.Generator().manual_seed(seed)
    vae.train().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        images = np.stack([base_example(seed * 10**7 + 5_000_000 + step * batch + i)[0] for i in range(batch)])
        x, target = images_to_pixels(images).to(device), images_to_tensor(images).to(device)
        latent = vae.encode(x).latent_dist.mean
        loss = (vae.decode(target).sample - x).abs().mean() + (latent - target).abs().mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3, 20)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        images = np.stack([base_example(EVAL_SEED_OFFSET + i)[0] for i in range(64)])
        x = images_to_pixels(images).to(device)
        error = (vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x).abs().mean() * 127.5
    return float(error)


def evaluate(folder: str, count: int = 200, device: str = "cpu", guidance: float | None = None) -> dict:
    """Sample ``count`` held-out captions and judge them: how often the requested objects appear."""
    from lib_loraclr.hosts.diffusers import load_base

    from .generate import GUIDANCE, generate
    from .judge import draws_requested

    model = load_base(folder, device=device)
    examples = [base_example(EVAL_SEED_OFFSET + i) for i in range(count)]
    images = generate(model, [e[1] for e in examples], list(range(count)), guidance=guidance or GUIDANCE)
    rows = [draws_requested(img, [o.attributes() for o in e[2].objects]) for img, e in zip(images, examples)]
    summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    by_count = {}
    for n in (1, 2, 3):
        picked = [r for r, e in zip(rows, examples) if len(e[2].objects) == n]
        if picked:
            by_count[n] = {"images": len(picked), "all_exact": float(np.mean([r["all_exact"] for r in picked])),
                           "object_exact": float(np.mean([r["object_exact"] for r in picked]))}
    return {"images": count, **summary, "by_object_count": by_count}, images, [e[1] for e in examples]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval", type=int, default=200, help="held-out captions to judge after training (0: none)")
    parser.add_argument("--workers", type=int, default=0, help="data-rendering processes (0: in the main one)")
    parser.add_argument("--vae-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: far faster than 2 on a shared 2-core machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    components = build_components(args.seed)
    unet, text_encoder = components["unet"].to(device).train(), components["text_encoder"].to(device).train()
    alphas_cumprod = torch.as_tensor(components["scheduler"].alphas_cumprod, dtype=torch.float32)
    modules = {"unet": unet, "text_encoder": text_encoder}
    ema = Ema(modules, decay=0.999)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    batches = torch.utils.data.DataLoader(
        Batches(components["tokenizer"], args.seed, args.batch, args.steps), batch_size=None,
        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
    )
    started = time.time()
    log = []
    for step, (clean, ids) in enumerate(batches):
        loss = diffusion_loss(unet, text_encoder, ids, clean.to(device), alphas_cumprod, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(modules, decay=min(0.999, (1 + step) / (10 + step)))
        log.append(float(loss))
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {np.mean(log[-200:]):.4f} {time.time() - started:.0f}s", flush=True)
    train_seconds = time.time() - started
    vae_error = train_vae(components["vae"], device, args.seed, steps=args.vae_steps)
    components["unet"] = ema.shadow["unet"].half().eval()
    components["text_encoder"] = ema.shadow["text_encoder"].half().eval()
    components["vae"] = components["vae"].half()
    os.makedirs(args.out, exist_ok=True)
    save_pipeline({k: v.cpu() if hasattr(v, "cpu") else v for k, v in components.items()}, args.out)
    info = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "device": str(device),
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1),
            "final_loss": float(np.mean(log[-200:])), "vae_mean_abs_error_0_255": round(vae_error, 2)}
    if args.eval:
        info["eval"], _, _ = evaluate(args.out, args.eval, device=args.device)
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
