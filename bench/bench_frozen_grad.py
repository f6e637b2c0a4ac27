"""Memory of CLoRA's latent gradient when the UNet's weights are inference tensors (Forge).

One command: ``python bench/bench_frozen_grad.py [--quick]``. Each variant runs in its own
process and reports the peak RSS added by one forward + backward of d(sum of output) /
d(latent) through an SD1-architecture diffusers UNet with random weights:

- ordinary: ordinary weights (A1111, diffusers): the reference;
- frozen:   inference-tensor weights inside ``GradThroughFrozen`` (what Forge runs);
- cloned:   inference-tensor weights, each cloned into an ordinary tensor first (the
            straightforward fix the frozen path avoids).

Prints each peak and its ratio to the ordinary one, and the weights' own size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def unet_config(quick: bool) -> dict:
    width = 64 if quick else 160  # SD1.5: 320
    return dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )


def run_variant(variant: str, quick: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from lib_loraclr.frozen_grad import GradThroughFrozen

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(quick)).eval().requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    if variant != "ordinary":
        with torch.inference_mode():
            for module in unet.modules():
                for name, parameter in list(module._parameters.items()):
                    if parameter is not None:
                        module._parameters[name] = torch.nn.Parameter(parameter.clone(), requires_grad=False)
    latent = torch.randn(2, 4, 32, 32)
    context = torch.randn(2, 77, 768)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    originals = []  # the host keeps its own (inference) weights while the clones exist
    if variant == "cloned":
        for module in unet.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None:
                    originals.append(parameter)
                    module._parameters[name] = torch.nn.Parameter(parameter.clone(), requires_grad=False)
    leaf = latent.clone().requires_grad_(True)
    mode = GradThroughFrozen() if variant == "frozen" else torch.enable_grad()
    with mode:
        output = unet(leaf, torch.tensor(500), encoder_hidden_states=context).sample
        (grad,) = torch.autograd.grad(output.square().sum(), leaf)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del originals
    return {"variant": variant, "peak_added_mib": (peak - before) / 1024, "weights_mib": weight_bytes / 2**20,
            "grad_norm": float(grad.norm())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller UNet (seconds)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.quick)))
        return 0
    results = {}
    for variant in ("ordinary", "frozen", "cloned"):
        command = [sys.executable, __file__, "--variant", variant] + (["--quick"] if args.quick else [])
        results[variant] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    reference = results["ordinary"]
    print(f"UNet weights: {reference['weights_mib']:.0f} MiB (float32)")
    print(f"{'variant':<10} {'peak added MiB':>15} {'vs ordinary':>12} {'grad norm':>12}")
    for variant, result in results.items():
        ratio = result["peak_added_mib"] / reference["peak_added_mib"]
        print(f"{variant:<10} {result['peak_added_mib']:>15.0f} {ratio:>11.2f}x {result['grad_norm']:>12.5g}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
    raise SystemExit(main())
