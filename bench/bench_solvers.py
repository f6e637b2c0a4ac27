"""Reference (authors' AdamW loop) vs fast (streamed fp32 statistics + closed form) LoRACLR layer solver.

Both solve the same synthetic SD1.5-sized layers; both results are scored with the exact loss
on the raw features. The fast time includes streaming the raw features into the statistics
the merge uses (``TargetStats``: fp32 TSQR of the inputs and LoRA coefficients).

    python bench/bench_solvers.py [--quick] [--device cuda] [--max-rows 1024] [--concepts 2,4,8] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_loraclr.merge.objective import MergeSettings, exact_loss  # noqa: E402
from lib_loraclr.merge.solvers import solve_fast, solve_reference  # noqa: E402
from lib_loraclr.lora.lowrank import LowRank  # noqa: E402
from lib_loraclr.merge.stats import TargetStats  # noqa: E402

# (name, D_in, D_out, rows of one concept at 512px over 20 sampling steps)
LAYERS = [
    ("attn1.q 320", 320, 320, 20 * 64 * 64),
    ("attn1.q 640", 640, 640, 20 * 32 * 32),
    ("attn1.q 1280", 1280, 1280, 20 * 16 * 16),
    ("attn2.k 768->320", 768, 320, 16),  # text rows: trigger tokens + EOS of two prompts
    ("ff 1280->5120", 1280, 5120, 20 * 16 * 16),
]
QUICK_LAYERS = ["attn1.q 320", "attn2.k 768->320"]


def synthetic_layer(d_in, d_out, rows, n_concepts, device, seed):
    """Features with a power-law spectrum and per-concept mean shifts; rank 8-32 LoRA deltas at 5-20% of ||W0||."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    spectrum = (1 + torch.arange(d_in, dtype=torch.float32)).pow(-0.8)
    spectrum *= d_in ** 0.5 / spectrum.norm()  # unit mean power per feature, like normalised activations
    shared_mean = 0.5 * torch.randn(d_in, generator=gen)
    base = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
    inputs, factors = [], []
    for _ in range(n_concepts):
        mean = shared_mean + 0.2 * torch.randn(d_in, generator=gen)
        inputs.append(((torch.randn(rows, d_in, generator=gen) * spectrum) @ basis.T + mean).to(device))
        rank = int(torch.randint(8, 33, (1,), generator=gen))
        up, down = torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen)
        relative = 0.05 + 0.15 * float(torch.rand(1, generator=gen))
        factors.append(LowRank(up * (relative * base.norm() / (up @ down).norm()), down).to(device))
    return base.to(device), inputs, factors


def release_free_heap():
    """Hand freed heap back to the OS (glibc), so RSS growth measures this block, not reuse of older frees."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0

    def _rss(self):
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._rss()
            self.running = True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while self.running:
            self.peak_bytes = max(self.peak_bytes, self._rss() - self.start)
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.sampler.join()
            self.peak_bytes = max(self.peak_bytes, self._rss() - self.start)

    @property
    def mib(self):
        return self.peak_bytes / 2 ** 20


def timed(device, fn):
    """(result, wall seconds, process CPU seconds); CPU time is steadier than wall time on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, started_cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started, time.process_time() - started_cpu


def run_case(name, d_in, d_out, rows, n_concepts, device, settings, seed):
    base, inputs, factors = synthetic_layer(d_in, d_out, rows, n_concepts, device, seed)
    deltas = [f.dense() for f in factors]
    with PeakMemory(device) as reference_memory:
        (reference_delta, _), reference_seconds, reference_cpu = timed(
            device, lambda: solve_reference(base, inputs, factors, settings)
        )
    with PeakMemory(device) as fast_memory:
        stats, stats_seconds, stats_cpu = timed(device, lambda: TargetStats.from_features(base, inputs, factors))
        (fast_delta, fast_info), solve_seconds, solve_cpu = timed(device, lambda: solve_fast(stats, factors, settings))
    del stats
    with torch.no_grad():
        zero_loss = float(exact_loss(torch.zeros_like(base), base, inputs, deltas, settings))
        reference_loss = float(exact_loss(reference_delta.dense(), base, inputs, deltas, settings))
        fast_loss = float(exact_loss(fast_delta.dense(), base, inputs, deltas, settings))
    fast_seconds = stats_seconds + solve_seconds
    return {
        "layer": name, "N": n_concepts, "rows": rows,
        "t_ref": reference_seconds, "t_stats": stats_seconds, "t_solve": solve_seconds, "t_fast": fast_seconds,
        "speedup": reference_seconds / fast_seconds, "cpu_speedup": reference_cpu / (stats_cpu + solve_cpu),
        "loss_zero": zero_loss, "loss_ref": reference_loss, "loss_fast": fast_loss, "loss_ratio": fast_loss / reference_loss,
        "certified": "yes" if fast_info["hinge_certified"] else "no",
        "mem_ref": reference_memory.mib, "mem_fast": fast_memory.mib,
    }


COLUMNS = [  # (key, width, format spec)
    ("layer", 17, "<"), ("N", 2, ">"), ("rows", 6, ">"),
    ("t_ref", 8, ">.3f"), ("t_stats", 8, ">.3f"), ("t_solve", 8, ">.3f"), ("t_fast", 8, ">.3f"), ("speedup", 8, ">.1f"), ("cpu_speedup", 11, ">.1f"),
    ("loss_zero", 11, ">.5g"), ("loss_ref", 11, ">.5g"), ("loss_fast", 11, ">.5g"), ("loss_ratio", 10, ">.5f"),
    ("certified", 9, ">"), ("mem_ref", 8, ">.1f"), ("mem_fast", 8, ">.1f"),
]


def print_row(values):
    print(" ".join(f"{values[key]:{spec[0]}{width}{spec[1:]}}" for key, width, spec in COLUMNS), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small layers, N = 2 and 4, at most 256 rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-rows", type=int, default=1024, help="cap on rows per concept (memory and reference time)")
    parser.add_argument("--concepts", default="2,4,8")
    parser.add_argument("--layers", default="", help="comma-separated substrings of layer names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 gives steadier timings on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = MergeSettings()
    layers = [layer for layer in LAYERS if not args.quick or layer[0] in QUICK_LAYERS]
    if args.layers:
        layers = [layer for layer in layers if any(part in layer[0] for part in args.layers.split(","))]
        if not layers:
            parser.error(f"--layers {args.layers!r} matches none of {[layer[0] for layer in LAYERS]}")
    concept_counts = [2, 4] if args.quick else [int(n) for n in args.concepts.split(",")]
    max_rows = min(args.max_rows, 256) if args.quick else args.max_rows
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"reference: AdamW lr {settings.lr} x {settings.iters} iters fp32; times in s (speedup: wall; cpu_speedup: process CPU time), memory = peak extra MiB "
          f"({'CUDA allocator' if device.type == 'cuda' else 'sampled RSS'}); losses are the exact loss on raw features\n")
    print(" ".join(f"{key:{spec[0]}{width}}" for key, width, spec in COLUMNS))
    warm_base, warm_inputs, warm_deltas = synthetic_layer(64, 64, 64, 2, device, args.seed)  # first-call overheads
    solve_reference(warm_base, warm_inputs, warm_deltas, settings)
    solve_fast(TargetStats.from_features(warm_base, warm_inputs, warm_deltas), warm_deltas, settings)
    rows_out = []
    for index, (name, d_in, d_out, full_rows) in enumerate(layers):
        for n_concepts in concept_counts:
            rows = min(full_rows, max_rows)
            result = run_case(name, d_in, d_out, rows, n_concepts, device, settings, args.seed + 100 * index + n_concepts)
            print_row(result)
            rows_out.append(result)
    worst_ratio = max(r["loss_ratio"] for r in rows_out)
    speedups = [r["speedup"] for r in rows_out]
    cpu_speedups = [r["cpu_speedup"] for r in rows_out]
    print(f"wall speedup min {min(speedups):.1f}x max {max(speedups):.1f}x; "
          f"CPU-time speedup min {min(cpu_speedups):.1f}x max {max(cpu_speedups):.1f}x; worst fast/reference loss ratio {worst_ratio:.4f}; "
          f"hinge certified in {sum(r['certified'] == 'yes' for r in rows_out)}/{len(rows_out)} cases")


if __name__ == "__main__":
    main()
