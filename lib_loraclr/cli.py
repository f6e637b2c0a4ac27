"""``python -m lib_loraclr inspect | merge | compose | demo``.

Errors are one line, ``error: ...`` naming the file or option, exit code 2; Ctrl-C exits 130
("cancelled", nothing written); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .merge.objective import METHODS, SOLVERS, MergeSettings
from .validation import InputError

# MergeSettings fields whose CLI option is not "--" + the field name with dashes.
_OPTION_OF_FIELD = {"report": "--no-report", "max_memory_gb": "--max-memory"}


def device_name(text: str) -> str:
    """argparse type of ``--device``: a device torch knows and this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu, cuda and mps devices are supported")
    return text


def option_names(error: InputError, fields) -> InputError:
    """A settings error with field names replaced by the CLI options that set them."""
    return error.renamed({name: _OPTION_OF_FIELD.get(name, "--" + name.replace("_", "-")) for name in fields}, "")


def _add_merge_settings(parser: argparse.ArgumentParser):
    defaults = MergeSettings()
    parser.add_argument("--method", choices=METHODS, default=defaults.method,
                        help="loraclr (contrastive, default), sum (plain stacking), svd (sum then SVD), lsq (Mix-of-Show), "
                             "distill (every layer fitted end to end to each concept's own LoRA; slower, keeps concepts best)")
    parser.add_argument("--solver", choices=SOLVERS, default=defaults.solver,
                        help="fast: closed form on Gram statistics (default); reference: the authors' AdamW loop")
    parser.add_argument("--margin", type=float, default=defaults.margin, help="contrastive margin (paper: 0.25-0.5)")
    parser.add_argument("--lambda-reg", type=float, default=defaults.lambda_reg,
                        help="weight of ||delta||_F; above 0.01 the paper finds concepts under-merged")
    parser.add_argument("--lambda-mse", type=float, default=defaults.lambda_mse, help="weight of the MSE term")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="reference solver only")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="reference solver only")
    parser.add_argument("--rank", type=int, default=None,
                        help=f"rank of the written LoRA (default: smallest keeping {defaults.energy * 100:g}%% energy, "
                             f"at most {defaults.max_rank})")
    parser.add_argument("--energy", type=float, default=defaults.energy,
                        help="share of each layer's delta the automatic rank keeps (0-1]")
    parser.add_argument("--max-rank", type=int, default=defaults.max_rank, help="cap of the automatic rank")
    parser.add_argument("--capture-steps", type=int, default=defaults.capture_steps,
                        help="sampling steps whose UNet layer inputs are captured")
    parser.add_argument("--capture-size", type=int, default=None, help="image size sampled for UNet features "
                        "(default 512 for SD1/SD2, 1024 for SDXL)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the capture sampling")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="memory the merge may use beyond the model, in GiB (default: half the free memory, at "
                             "most 4); when the layers' statistics exceed it, features are captured in several passes")
    parser.add_argument("--prompt-template", default=defaults.prompt_template,
                        help="each concept's prompt, {} = its trigger words (default %(default)r)")
    parser.add_argument("--distill-iters", type=int, default=defaults.distill_iters,
                        help="distill: training steps (each: a batch through the text encoder and UNet, and back)")
    parser.add_argument("--distill-lr", type=float, default=defaults.distill_lr, help="distill: Adam's learning rate")
    parser.add_argument("--distill-batch", type=int, default=defaults.distill_batch,
                        help="distill: trajectory points per step (the UNet runs on twice as many rows)")
    parser.add_argument("--distill-trajectories", type=int, default=defaults.distill_trajectories,
                        help="distill: images each concept's own LoRA samples for the teacher pool")
    parser.add_argument("--distill-pair-trajectories", type=int, default=defaults.distill_pair_trajectories,
                        help="distill: images per concept pair composed from the two LoRAs in their own regions "
                             "(masked composition) added to the pool; 0 = none. Lowers bleeding, may cost "
                             "single-concept fidelity")
    parser.add_argument("--distill-pair-weight", type=float, default=defaults.distill_pair_weight,
                        help="distill: loss weight of those composed pair points against a concept's own (default %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help="distill: classifier-free guidance of those teacher images")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the quality report (it costs one more capture pass per stage)")
    parser.add_argument("--no-end-to-end", action="store_true",
                        help="skip the end-to-end figure (3 UNet evaluations of a batch of 4 per concept)")


def _settings_from(args) -> MergeSettings:
    values = dict(
        method=args.method, solver=args.solver, margin=args.margin, lambda_reg=args.lambda_reg,
        lambda_mse=args.lambda_mse, lr=args.lr, iters=args.iters, rank=args.rank, energy=args.energy,
        max_rank=args.max_rank, capture_steps=args.capture_steps, capture_size=args.capture_size, seed=args.seed,
        report=not args.no_report, end_to_end=not args.no_end_to_end, max_memory_gb=args.max_memory,
        prompt_template=args.prompt_template, distill_iters=args.distill_iters, distill_lr=args.distill_lr,
        distill_batch=args.distill_batch, distill_trajectories=args.distill_trajectories,
        distill_pair_trajectories=args.distill_pair_trajectories, distill_pair_weight=args.distill_pair_weight,
        guidance_scale=args.guidance_scale,
    )
    try:
        return MergeSettings(**values)
    except InputError as error:
        raise option_names(error, values) from None


def cmd_inspect(args) -> int:
    from .lora.reader import describe, read_lora

    for path in args.files:
        info = describe(read_lora(path))
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            print(path)
            for key, value in info.items():
                print(f"  {key:<16} {value}")
    return 0


def progress_bar():
    from tqdm import tqdm

    from .progress import Progress

    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}] {postfix}")

    def listener(state):
        bar.n = round(100 * state.fraction, 1)
        bar.set_description(state.stage)
        bar.set_postfix_str((state.layer or state.message)[-48:], refresh=False)
        bar.refresh()

    return Progress(listener), bar


def cmd_merge(args) -> int:
    from .hosts.diffusers import load_base
    from .merge.engine import check_concepts
    from .merge.pipeline import check_outputs, load_concepts, merge_to_file

    if args.report and args.no_report:
        raise ValueError("--report writes the quality report: drop --no-report, or --report")
    settings = _settings_from(args)
    concepts = load_concepts(args.lora, args.trigger, args.weight)
    check_outputs(args.out, args.overwrite, args.report, args.lora)
    check_concepts(concepts)
    model = load_base(args.base, config=args.config, device=args.device)
    progress, bar = progress_bar()
    try:
        summary = merge_to_file(model, concepts, settings, args.out, overwrite=args.overwrite,
                                report_path=args.report, progress=progress)
    finally:
        bar.close()
    if summary["table"]:
        print(summary["table"])
    passes = {stage: n for stage, n in summary["memory"]["passes"].items() if n > 1}
    if passes:
        print(f"statistics captured in several passes to stay within the memory budget: {passes}")
    batches = {stage: n for stage, n in summary["memory"]["batches"].items() if n > 1}
    if batches:
        print(f"concepts sampled in several batches per pass to stay within the memory budget: {batches}")
    distill = summary["distill"]
    if distill:
        capture = distill["capture_size"]
        smaller = f", not {capture} px: raise --max-memory to train at {capture} px" if distill["size"] < capture else ""
        pairs = f" ({distill['pair_samples']} of them composed pairs)" if distill["pair_samples"] else ""
        print(f"distill: teacher and training at {distill['size']} px{smaller}; pool of {distill['pool_samples']} "
              f"points{pairs}; {distill['steps']} steps, "
              f"loss {distill['loss_first']:.4g} -> {distill['loss_last']:.4g} (lowest {distill['loss_min']:.4g})")
    print(f"wrote {summary['output']} ({summary['layers']} layers, method {summary['method']})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, device=args.device)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors (no usage dump); exit code 2 as argparse's own."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_loraclr", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = _Parser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", parents=[common], help="describe LoRA files: format, architecture, rank, triggers")
    inspect.add_argument("files", nargs="+")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    merge = commands.add_parser("merge", parents=[common], help="merge concept LoRAs into one LoRA file")
    merge.add_argument("--base", required=True, help="diffusers folder or single-file SD1/SDXL .safetensors")
    merge.add_argument("--config", help="local diffusers folder with configs + tokenizer, for a single-file base")
    merge.add_argument("--lora", action="append", required=True, help="a LoRA file (repeat)")
    merge.add_argument("--trigger", action="append",
                       help="trigger words of the matching --lora (repeat, in order; without any --trigger they "
                            "come from each LoRA's sidecar or metadata)")
    merge.add_argument("--weight", action="append", type=float, help="strength of the matching --lora (default 1, at most 10)")
    merge.add_argument("--out", required=True, help="output .safetensors path")
    merge.add_argument("--report", help="also write the quality report as JSON here")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace existing output files (never the merge's own input files)")
    merge.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda, cuda:1 ...")
    _add_merge_settings(merge)
    merge.set_defaults(func=cmd_merge)

    from .compose.pipeline import add_compose_command

    add_compose_command(commands, parents=[common])

    demo = commands.add_parser("demo", parents=[common], help="merge tiny built-in concept LoRAs on a tiny built-in model")
    demo.add_argument("--out", default="loraclr_demo", help="folder for the demo's files (a new one is picked if it exists)")
    demo.add_argument("--device", default="cpu", type=device_name)
    demo.set_defaults(func=cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    """The message of an error as one line; errors that are not about the input say what they are."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, KeyError, MemoryError)):
        return message
    return f"{type(error).__name__}: {message} (run with --debug for the traceback)"


def main(argv=None) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("cancelled: nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line; --debug for the traceback
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
