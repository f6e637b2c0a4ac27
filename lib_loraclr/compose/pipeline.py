"""Standalone CLoRA generation on a diffusers model, and the ``compose`` CLI command.

The sampler is the engine's own (``sampling``'s k-diffusion formulation, trailing
timesteps): ``x = x0 + sigma * noise``, the UNet sees ``z = x / sqrt(1 + sigma^2)``. The
CLoRA latent update acts on z, the latent the UNet is fed, as in the reference (which
updates diffusers' latents); x is rescaled from the updated z before the solver step.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..hosts.diffusers import DiffusersModel
from ..lora.base import LoraFile
from ..lora.reader import read_lora
from ..lora.writer import check_output_files, write_files
from ..model import at_least_float32
from ..runtime import LoraRuntime
from ..sampling import SAMPLERS, decode_latents, initial_noise, sample_steps, sigmas_for, trailing_timesteps
from ..validation import InputError, Seed, checked, integer
from .attention import cross_attention_modules
from .concepts import ConceptPlan, LoraConcept
from .engine import encode_passes
from .fusion import pass_lora_sets
from .methods import build_engine, plan_for
from .overlay import overlay_sheet
from .settings import METHODS, ComposeSettings

# ComposeSettings fields whose CLI option is not "--" + the field name with dashes.
_SETTING_OPTIONS = {"--guidance-scale": "--guidance", "--attention-res-divisor": "--attention-divisor",
                    "--use-latent-update": "--no-latent-update", "--use-masks": "--no-masks",
                    "--exclusive-masks": "--union-masks"}


@dataclass
class ComposeResult:
    """images: B PIL images; latents: (B, C, h, w) final x0; masks: (P, B, 1, h, w) last
    step's fusion weights; plan: the passes and concept groups used; mask_history and
    loss_history: each step's masks and latent-update losses (``keep_mask_history=True``)."""

    images: list
    latents: torch.Tensor
    masks: torch.Tensor
    plan: ConceptPlan
    mask_history: list[torch.Tensor] | None = None  # every step's masks (CPU), when asked for
    loss_history: list[list[float]] | None = None  # every step's contrastive losses (image 0), when asked for


class CLoRAPipeline:
    """CLoRA text-to-image on a ``DiffusersModel`` (its VAE decodes unless another is given)."""

    def __init__(self, model: DiffusersModel, vae=None):
        self.model = model
        self.vae = vae if vae is not None else model.vae

    def __call__(
        self,
        prompt: str,
        concepts: Sequence[LoraConcept],
        loras: Sequence[LoraFile],
        *,
        styles: Sequence[tuple[LoraFile, Sequence[int] | None]] = (),
        lora_weights: Sequence[float] | None = None,
        negative_prompt: str = "",
        steps: int = 50,
        seed: int = 0,
        height: int = 512,
        width: int = 512,
        batch_size: int = 1,
        settings: ComposeSettings | None = None,
        sampler: str = "dpmpp_2m",
        mode: str = "fast",
        callback: Callable[[int, int], None] | None = None,
        decode: bool = True,
        keep_mask_history: bool = False,
    ) -> ComposeResult:
        """Generate ``batch_size`` images of ``prompt`` with one subject LoRA per concept.

        styles: (LoRA, None) for a global style, (LoRA, concept indices) to limit it to those
        subjects' masks. lora_weights: one multiplier per subject then per style LoRA.
        """
        settings = settings or ComposeSettings()
        if len(concepts) != len(loras):
            raise ValueError(f"{len(concepts)} concepts but {len(loras)} subject LoRAs: give one LoRA per concept")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        model = self.model
        factor = model.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        plan = plan_for(settings, prompt, concepts, model.tokenizer)
        all_loras = list(loras) + [style for style, _ in styles]
        style_groups = {len(loras) + i: groups for i, (_, groups) in enumerate(styles)}
        lora_sets = pass_lora_sets(plan, style_groups)

        with LoraRuntime(model.targets(), all_loras, lora_weights) as runtime:
            conditioning = encode_passes(model.encode, runtime, plan, lora_sets, negative_prompt, batch_size)
            engine = build_engine(
                plan, settings, runtime, lora_sets, cross_attention_modules(model.unet), steps,
                vae_scale_factor=factor, mode=mode,
            )
            history, losses = ([], []) if keep_mask_history else (None, None)
            latents, masks = self._sample(engine, conditioning, steps, seed, height, width, sampler, callback,
                                          history, losses)
        images = decode_latents(self.vae, latents) if decode else []
        return ComposeResult(images, latents, masks, plan, history, losses)

    def _sample(self, engine, conditioning, steps, seed, height, width, sampler, callback, history, losses):
        """The engine's sampler (``sampling.sample_steps``), CLoRA's step in place of the UNet call."""
        model = self.model
        timesteps = trailing_timesteps(len(model.alphas_cumprod), steps)
        sigmas = sigmas_for(model.alphas_cumprod, timesteps).tolist()
        shape = (conditioning.batch_size, model.latent_channels, height // model.vae_scale_factor,
                 width // model.vae_scale_factor)
        x = initial_noise(shape, seed).to(model.device, torch.promote_types(model.dtype, torch.float32))
        x = x * (1.0 + sigmas[0] ** 2) ** 0.5
        masks = None

        def step(i, x, sigma, timestep):
            nonlocal masks
            input_scale = (1.0 + sigma**2) ** -0.5
            result = engine.step(i, (x * input_scale).to(model.dtype),
                                 torch.tensor(timestep, device=model.device), conditioning, model.unet_eps)
            masks = result.masks
            if history is not None:
                history.append(masks.detach().cpu())
                losses.append([float(loss[0]) for loss in result.losses])
            x = at_least_float32(result.latent) / input_scale
            return x, x - sigma * result.prediction

        x = sample_steps(x, sigmas, timesteps, step, sampler=sampler, callback=callback)
        return x, masks


def parse_size(text: str) -> tuple[int, int]:
    """"512" or "768x512" (width x height) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"size {text!r}: expected N or WIDTHxHEIGHT, e.g. 512 or 768x512") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ValueError(f"size {text!r}: expected N or WIDTHxHEIGHT, e.g. 512 or 768x512")
    width, height = parts
    return height, width


def _image_bytes(image: Image.Image, path: str) -> bytes:
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"{path}: unknown image type {extension!r} (use .png, .jpg or .webp)")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _check_outputs(outputs: dict[str, str], overwrite: bool, inputs: Sequence[str]) -> None:
    check_output_files(outputs, overwrite, inputs)
    for path in outputs.values():
        _image_bytes(Image.new("RGB", (1, 1)), path)


@checked(frozen=True, what="")
class GenerationOptions:
    """The sampling run's size, steps and seed; bounded so a typo cannot run for days."""

    steps: integer(ge=1, le=1000) = 50
    seed: Seed = 0
    height: integer(ge=8, le=2048) = 512
    width: integer(ge=8, le=2048) = 512


def _read_loras(paths: Sequence[str], role: str) -> list[LoraFile]:
    loras = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{role} LoRA {path}: no such file")
        loras.append(read_lora(path))
    return loras


def _subject_numbers(text: str | None, count: int) -> list[int] | None:
    """"1,3" -> [0, 2] (subject indices); None / "" -> None (everywhere)."""
    if not text:
        return None
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--style-on {text!r}: give --lora numbers like 1,3") from None
    if any(not 1 <= n <= count for n in numbers):
        raise ValueError(f"--style-on {text!r}: --lora numbers go from 1 to {count}")
    return [n - 1 for n in numbers]


def compose(
    base: str,
    prompt: str,
    loras: Sequence[str],
    words: Sequence[str],
    out: str,
    *,
    triggers: Sequence[str | None] | None = None,
    styles: Sequence[str] = (),
    style_subjects: Sequence[str | None] | None = None,
    negative_prompt: str = "",
    steps: int = 50,
    seed: int = 0,
    size: tuple[int, int] = (512, 512),
    settings: ComposeSettings | None = None,
    sampler: str = "dpmpp_2m",
    save_masks: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    config: str | None = None,
    progress: bool = True,
) -> dict:
    """Load a base model and LoRA files, generate one CLoRA image, write it (and the masks).

    ``style_subjects[k]`` limits style k to subjects given as 1-based ``--lora`` numbers
    ("1,3"); None or "" applies it everywhere. Everything that can be checked before the
    model loads is checked first. Returns
    {"image": path, "masks": path or None, "passes": [prompts]}.
    """
    from ..hosts.diffusers import load_base

    triggers = list(triggers) if triggers else [None] * len(loras)
    if not loras:
        raise ValueError("give at least one --lora")
    if len(words) != len(loras) or len(triggers) != len(loras):
        raise ValueError(
            f"{len(loras)} --lora but {len(words)} --words and {len(triggers)} --trigger: give one of each per --lora"
        )
    options = GenerationOptions(steps, seed, *size)
    outputs = {"image": out, **({"masks": save_masks} if save_masks else {})}
    _check_outputs(outputs, overwrite, list(loras) + list(styles))
    subject_loras = _read_loras(loras, "subject")
    style_loras = _read_loras(styles, "style")
    style_groups = [_subject_numbers(text, len(loras)) for text in (style_subjects or [None] * len(styles))]
    if len(style_groups) != len(style_loras):
        raise ValueError(f"{len(style_loras)} --style but {len(style_groups)} --style-on: give one per --style or none")
    concepts = [LoraConcept(w, t or None) for w, t in zip(words, triggers)]
    model = load_base(base, config=config, device=device)
    steps, seed, height, width = options.steps, options.seed, options.height, options.width
    bar = None
    if progress:
        from ..cli import progress_bar

        sink, bar = progress_bar()

        def callback(i, n):
            sink.update("compose", i + 1, n, message=f"sampling step {i + 1}/{n}")
    try:
        result = CLoRAPipeline(model)(
            prompt, concepts, subject_loras, styles=list(zip(style_loras, style_groups)),
            negative_prompt=negative_prompt, steps=steps, seed=seed, height=height, width=width,
            settings=settings, sampler=sampler, callback=callback if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
    files = {out: _image_bytes(result.images[0], out)}
    if save_masks:
        sheet = overlay_sheet(result.images, result.masks, [lora.name for lora in subject_loras])
        files[save_masks] = _image_bytes(sheet, save_masks)
    write_files(files, overwrite)
    return {"image": out, "masks": save_masks, "passes": [p.clean_prompt for p in result.plan.passes]}


def cmd_compose(args) -> int:
    from ..cli import option_names

    values = dict(
        guidance_scale=args.guidance, step_size=args.step_size, mask_threshold=args.mask_threshold,
        attention_res_divisor=args.attention_divisor, use_latent_update=not args.no_latent_update,
        use_masks=not args.no_masks, method=args.method, warmup_steps=args.warmup_steps,
        layout_steps=args.layout_steps,
        exclusive_masks=not args.union_masks,
    )
    try:
        settings = ComposeSettings(**values)
    except InputError as error:
        raise option_names(error, values).renamed(_SETTING_OPTIONS) from None
    try:
        summary = compose(
            args.base, args.prompt, args.lora, args.words or [], args.out, triggers=args.trigger,
            styles=args.style or [], style_subjects=args.style_on, negative_prompt=args.negative_prompt,
            steps=args.steps, seed=args.seed, size=parse_size(args.size), settings=settings, sampler=args.sampler,
            save_masks=args.save_masks, overwrite=args.overwrite, device=args.device, config=args.config,
        )
    except InputError as error:
        raise error.renamed({"steps": "--steps", "seed": "--seed", "height": "--size", "width": "--size"}) from None
    for i, pass_prompt in enumerate(summary["passes"]):
        print(f"pass {i}: {pass_prompt}")
    print(f"wrote {summary['image']}" + (f" and {summary['masks']}" if summary["masks"] else ""))
    return 0


def add_compose_command(subparsers, parents=()):
    """Add ``compose`` to the CLI's subparsers; returns its parser."""
    from ..cli import device_name

    defaults = ComposeSettings()
    parser = subparsers.add_parser("compose", parents=list(parents),
                                   help="generate an image with several LoRAs composed (CLoRA or single pass)")
    parser.add_argument("--base", required=True, help="diffusers folder or single-file SD checkpoint")
    parser.add_argument("--config", help="local diffusers folder with configs + tokenizer, for a single-file base")
    parser.add_argument("--prompt", required=True, help='base prompt naming every subject, e.g. "a cat and a dog"')
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--lora", action="append", required=True, help="a subject LoRA file (repeat)")
    parser.add_argument("--words", action="append", help="the prompt words of the matching --lora's subject (repeat)")
    parser.add_argument("--trigger", action="append",
                        help="trigger word(s) of the matching --lora, inserted before its words in its own prompt "
                             "(repeat in order; '' for none)")
    parser.add_argument("--style", action="append", help="a style LoRA, applied to the whole image (repeat)")
    parser.add_argument("--style-on", action="append",
                        help="limit the matching --style to these subjects, as --lora numbers (e.g. 1,3)")
    parser.add_argument("--out", required=True, help="output image (.png, .jpg, .webp)")
    parser.add_argument("--save-masks", help="also write each subject's mask over the image here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    parser.add_argument("--size", default="512", help="N or WIDTHxHEIGHT in pixels")
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    parser.add_argument("--step-size", type=float, default=defaults.step_size, help="latent update step size")
    parser.add_argument("--mask-threshold", type=float, default=defaults.mask_threshold)
    parser.add_argument("--attention-divisor", type=int, default=defaults.attention_res_divisor,
                        help="read attention maps at image size / this (32: 16x16 at 512px)")
    parser.add_argument("--no-latent-update", action="store_true", help="skip the contrastive latent update")
    parser.add_argument("--no-masks", action="store_true", help="average the passes instead of masking")
    parser.add_argument("--method", choices=METHODS, default=defaults.method,
                        help="masked (default): one UNet pass per step, each LoRA's output kept to its subject's "
                             "mask; clora: one UNet pass per LoRA fused by masks (the paper)")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="masked: first steps without the subject LoRAs, to form the first masks")
    parser.add_argument("--layout-steps", type=int, default=defaults.layout_steps,
                        help="masked: then this many steps (of 50, rescaled) with each subject in its own stripe "
                             "of the image, in --lora order, left to right (0: none)")
    parser.add_argument("--union-masks", action="store_true",
                        help="clora: the paper's overlapping masks instead of one subject per pixel")
    parser.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda, cuda:1 ...")
    parser.set_defaults(func=cmd_compose)
    return parser
