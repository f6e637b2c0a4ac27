"""Peak memory and time of the real merge CLI on full-width SD1.5 / SDXL with 2-12 community LoRAs.

Why: the merge used to hold, for every one of the ~260 (SD1.5) / ~990 (SDXL) layers a kohya
LoRA adapts, an (N, D_in, D_in) float64 Gram plus N dense fp32 deltas; at full width that is
tens of GiB. This bench runs ``python -m lib_loraclr merge`` in a fresh child per case, on a
random-weight model with SD1.5's / SDXL's real configs (built once into ``--cache``) and N
random rank-16 LoRAs covering what kohya trains by default, and meters the child: VmRSS
sampled every 50 ms (attributed to the merge stage the progress bar shows) and the kernel's
high-water mark from wait4. Each N runs twice, with the quality report and with
``--no-report`` (when the CLI has it). "model" is a child that only runs ``load_base``.

    python bench/bench_merge_scale.py [--quick] [--arch sd1|sdxl|both] [--counts 2,4,8,12]
        [--capture-size 64] [--capture-steps 2] [--cache DIR] [--max-memory GIB] [--json FILE]
        [--method loraclr|lsq|sum|svd|distill] [--distill-iters 8] [--distill-pair-trajectories N]

--quick: sd1 only, N = 2 and 4, 64 px, 2 steps (flags given explicitly still win).
Capture size and steps only change the rows streamed through the statistics and the UNet's
activation memory, not the statistics' size; the CLI's native 512 / 1024 px x 20 steps takes
hours on a CPU. Full-width SDXL loads as 12.9 GiB of fp32 weights (3.47 B parameters): run it only on a big machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPO_ROOT)

GIB = 2 ** 30
DEFAULT_COUNTS = {"sd1": [2, 4, 8, 12], "sdxl": [2, 4]}
# Acceptance targets of the rewritten engine: peak RSS beyond the loaded model, up to 12 LoRAs.
TARGET_EXTRA_GIB = {"sd1": 4.0, "sdxl": 12.0}
TARGET_MAX_LORAS = 12
SAMPLE_SECONDS = 0.05
LOAD_RESULT_TAG = "LOAD_RESULT "
# The CLI's tqdm bar starts each redraw (a \r- or \n-separated segment) with "<stage>: NN%|"
# (cli._progress_bar); diffusers' own bars read "Loading weights: NN%|", so only segment starts count.
STAGE_PATTERN = re.compile(r"([a-z_]+): *\d+%\|")
SEGMENT_BREAK = re.compile(r"[\r\n]")
BEFORE_PROGRESS = "start+load"  # the stage label until the merge's first progress update


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class MeteredRun:
    """Run a command as a child; sample its RSS by merge stage, kill it above a limit or timeout.

    The peak is the largest of the samples, the last VmHWM read and wait4's ru_maxrss (the
    kernel's high-water mark, exact even for spikes shorter than a sample interval).
    """

    def __init__(self, argv: list[str], kill_above: int | None, timeout: float, env: dict | None = None):
        self.argv = argv
        self.kill_above = kill_above
        self.timeout = timeout
        self.env = env
        self.stage = BEFORE_PROGRESS
        self.stage_peaks: dict[str, int] = {}
        self.stage_started: dict[str, float] = {}  # seconds after start
        self.sampled_peak = 0
        self.last_hwm = 0
        self.killed = None
        self.stdout_text = ""
        self.stderr_tail = ""

    def _sample(self, pid: int):
        while not self.done.is_set():
            status = proc_status(pid)
            rss = status.get("VmRSS", 0)
            self.last_hwm = max(self.last_hwm, status.get("VmHWM", 0))
            self.sampled_peak = max(self.sampled_peak, rss)
            self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), rss)
            if self.kill_above and rss > self.kill_above and self.killed is None:
                self.killed = f"RSS {rss / GIB:.2f} GiB above the --kill-above limit {self.kill_above / GIB:.1f} GiB"
                os.kill(pid, signal.SIGKILL)
            self.done.wait(SAMPLE_SECONDS)

    def _read_stderr(self, stream):
        """Follow the progress bar's stage names; keep the tail for error messages."""
        tail, segment = "", ""  # segment: the text since the last \r or \n
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            text = chunk.decode("utf-8", "replace")
            parts = SEGMENT_BREAK.split(segment + text)
            for part in parts:
                match = STAGE_PATTERN.match(part)
                if match is not None:
                    stage = match.group(1)
                    if stage not in self.stage_started:
                        self.stage_started[stage] = time.perf_counter() - self.started
                    self.stage = stage
            segment = parts[-1][-200:]
            tail = (tail + text)[-8000:]
        self.stderr_tail = tail

    def _read_stdout(self, stream):
        self.stdout_text = stream.read().decode("utf-8", "replace")

    def run(self) -> dict:
        self.done = threading.Event()
        self.started = time.perf_counter()
        child = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threads = [
            threading.Thread(target=self._sample, args=(child.pid,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(child.stderr,), daemon=True),
            threading.Thread(target=self._read_stdout, args=(child.stdout,), daemon=True),
        ]
        for thread in threads:
            thread.start()

        def on_timeout():
            if self.killed is None:
                self.killed = f"ran past the {self.timeout:.0f} s timeout"
            child.kill()

        timer = threading.Timer(self.timeout, on_timeout)
        timer.start()
        try:
            _, wait_status, usage = os.wait4(child.pid, 0)
        except BaseException:  # Ctrl-C: never leave a many-GiB child behind
            child.kill()
            child.wait()
            raise
        wall = time.perf_counter() - self.started
        timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(wait_status)
        self.done.set()
        for thread in threads:
            thread.join()
        max_rss = usage.ru_maxrss * 1024  # KiB on Linux
        merge_start = min(self.stage_started.values()) if self.stage_started else None
        after_start = [peak for stage, peak in self.stage_peaks.items() if stage != BEFORE_PROGRESS]
        return {
            "argv": self.argv,
            "rc": child.returncode,
            "killed": self.killed,
            "wall_s": wall,
            "merge_s": None if merge_start is None else wall - merge_start,
            "peak_rss": max(self.sampled_peak, self.last_hwm, max_rss),
            "sampled_peak_rss": self.sampled_peak,
            # from the first progress update on: the merge itself, without the loader's transient
            "merge_peak_rss": max(after_start) if after_start else None,
            "wait4_maxrss": max_rss,
            "stage_peaks": dict(self.stage_peaks),
            "stage_started_s": dict(self.stage_started),
            "stdout": self.stdout_text[-4000:],
            "stderr_tail": self.stderr_tail[-4000:],
        }


CHILD_THREADS: int | None = None  # --threads, for every child


def child_env() -> dict:
    env = dict(os.environ)
    if CHILD_THREADS:
        env.update(OMP_NUM_THREADS=str(CHILD_THREADS), MKL_NUM_THREADS=str(CHILD_THREADS))
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def cli_flags() -> set[str]:
    """Long options ``merge`` accepts today (the CLI is being changed while this bench exists)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "lib_loraclr", "merge", "--help"], cwd=REPO_ROOT, env=child_env(),
        capture_output=True, text=True, check=True,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def load_only(folder: str, targets_path: str | None) -> None:
    """Child mode: load the base as the CLI does, print its RSS and sanity checks as one JSON line."""
    import torch

    from lib_loraclr.hosts.diffusers import load_base

    started = time.perf_counter()
    model = load_base(folder)
    load_seconds = time.perf_counter() - started
    status = proc_status(os.getpid())
    modules = [model.unet, model.text_encoder, model.text_encoder_2, model.vae]
    parameters = [p for module in modules if module is not None for p in module.parameters()]
    result = {
        "rss": status.get("VmRSS"), "hwm": status.get("VmHWM"), "load_s": load_seconds, "arch": model.arch,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in parameters),
        "weight_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "nonfinite_tensors": sum(not bool(torch.isfinite(p).all()) for p in parameters),
    }
    if targets_path:
        with open(targets_path, encoding="utf-8") as f:
            wanted = json.load(f)
        present = model.targets()
        result["lora_targets"] = len(wanted)
        result["lora_targets_missing"] = sorted(t for t in wanted if t not in present)[:5]
    print(LOAD_RESULT_TAG + json.dumps(result), flush=True)


def measure_model(folder: str, targets_path: str, kill_above: int | None, timeout: float) -> dict:
    run = MeteredRun(
        [sys.executable, os.path.abspath(__file__), "--_load-only", folder, "--_targets", targets_path],
        kill_above, timeout, child_env(),
    ).run()
    lines = [line for line in run["stdout"].splitlines() if line.startswith(LOAD_RESULT_TAG)]
    if run["rc"] != 0 or not lines:
        raise RuntimeError(f"loading {folder} failed (rc {run['rc']}, {run['killed'] or ''}):\n{run['stderr_tail']}")
    run.update(json.loads(lines[-1][len(LOAD_RESULT_TAG):]))
    if run["nonfinite_tensors"]:
        raise RuntimeError(f"{folder}: {run['nonfinite_tensors']} weight tensors are not finite")
    if run.get("lora_targets_missing"):
        raise RuntimeError(f"{folder}: LoRA targets missing from load_base's targets(): {run['lora_targets_missing']}")
    return run


def merge_argv(args, folder, loras, triggers, work, n, report, flags) -> list[str]:
    argv = [sys.executable, "-m", "lib_loraclr", "merge", "--base", folder]
    for path, trigger in zip(loras, triggers):
        argv += ["--lora", path, "--trigger", trigger]
    argv += ["--out", os.path.join(work, f"merged_{n}{'' if report else '_noreport'}.safetensors"),
             "--capture-size", str(args.capture_size), "--capture-steps", str(args.capture_steps),
             "--device", args.device, "--overwrite", "--method", args.method]
    if args.method == "distill":
        argv += ["--distill-iters", str(args.distill_iters)]
        if args.distill_pair_trajectories is not None:
            argv += ["--distill-pair-trajectories", str(args.distill_pair_trajectories)]
    argv += ["--report", os.path.join(work, f"report_{n}.json")] if report else ["--no-report"]
    if args.max_memory is not None and "--max-memory" in flags:
        argv += ["--max-memory", f"{args.max_memory:g}"]
    return argv


def run_merge(argv, kill_above, timeout, report_path=None) -> dict:
    run = MeteredRun(argv, kill_above, timeout, child_env()).run()
    run["seconds"] = run["memory"] = run["distill"] = None
    if run["rc"] == 0 and report_path and os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:
            summary = json.load(f)
        run["seconds"], run["memory"], run["distill"] = summary.get("seconds"), summary.get("memory"), summary.get("distill")
    return run


def gib(value):
    return None if value is None else value / GIB


def fmt(value, spec=".2f", missing="-"):
    return missing if value is None else format(value, spec)


def out_of_memory(run) -> bool:
    """Killed by our RSS limit or by SIGKILL (the kernel's OOM killer), not by a timeout or an error."""
    return run["rc"] == -signal.SIGKILL and (run["killed"] is None or run["killed"].startswith("RSS"))


def describe_failure(run) -> str:
    if run["killed"]:
        return f"killed: {run['killed']}"
    if run["rc"] < 0:
        return f"died of signal {-run['rc']} (SIGKILL is what the kernel's OOM killer sends)"
    error_lines = [line for line in run["stderr_tail"].splitlines() if line.strip()]
    return f"exit {run['rc']}: " + (error_lines[-1][-300:] if error_lines else "no message")


def print_run_detail(label, run):
    if run["rc"] != 0:
        print(f"    {label}: FAILED after {run['wall_s']:.1f} s, peak {gib(run['peak_rss']):.2f} GiB; {describe_failure(run)}")
    else:
        print(f"    {label}: peak {gib(run['peak_rss']):.2f} GiB (sampled {gib(run['sampled_peak_rss']):.2f}, "
              f"after the first progress update {fmt(gib(run['merge_peak_rss']))}), "
              f"wall {run['wall_s']:.1f} s, merge {fmt(run['merge_s'], '.1f')} s")
    order = sorted(run["stage_peaks"], key=lambda s: run["stage_started_s"].get(s, -1))
    print("      peak RSS by stage (GiB): " + ", ".join(f"{s} {gib(run['stage_peaks'][s]):.2f}" for s in order))
    if run.get("seconds"):
        print("      report seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run["seconds"].items()))
    if run.get("memory"):
        memory = run["memory"]
        print(f"      memory plan: budget {gib(memory['budget_bytes']):.2f} GiB, capture passes {memory['passes']}, "
              f"concept batches per pass {memory.get('batches', {})}, statistics peak "
              f"{gib(memory['peak_statistics_bytes']):.2f} GiB")
    if run.get("distill") and run.get("seconds"):
        distill = run["distill"]
        steps = run["seconds"]["distill"] / distill["steps"]
        print(f"      distill: pool of {distill['pool_samples']} points, {distill['draws_per_forward']} draws per forward "
              f"(backward estimate {gib(distill['backward_bytes_per_draw']):.2f} GiB per draw), "
              f"{steps:.2f} s per step, loss {distill['loss_first']:.4g} -> {distill['loss_last']:.4g}")


def bench_arch(args, arch, counts, flags, kill_above, log) -> dict:
    from full_width import ensure_loras, ensure_model, old_design_bytes, trigger_of

    folder, targets, build_seconds = ensure_model(args.cache, arch, args.width_scale, log=log)
    targets_path = os.path.join(os.path.dirname(folder), "targets.json")
    loras = ensure_loras(args.cache, arch, args.width_scale, targets, max(counts), log=log)
    model = measure_model(folder, targets_path, kill_above, args.timeout)
    log(f"{arch} model: {model['parameters'] / 1e9:.2f} B parameters loaded as {model['dtype']} in {model['load_s']:.1f} s "
        f"(child wall {model['wall_s']:.1f} s); RSS after load_base {gib(model['rss']):.2f} GiB "
        f"(weights {gib(model['weight_bytes']):.2f} GiB, load peak {gib(model['peak_rss']):.2f} GiB); "
        f"{model['lora_targets']} LoRA targets")
    target_gib = TARGET_EXTRA_GIB[arch]
    rows = []
    out_of_memory_at = None
    for n in counts:
        if out_of_memory_at is not None and n > out_of_memory_at:
            print(f"    {arch} N={n}: skipped, N={out_of_memory_at} already ran out of memory")
            rows.append(skipped_row(arch, args.width_scale, n, model, targets, out_of_memory_at))
            continue
        triggers = [trigger_of(i) for i in range(n)]
        work = tempfile.mkdtemp(prefix=f"loraclr_bench_{arch}_{n}_", dir=args.work_dir)
        try:
            argv = merge_argv(args, folder, loras[:n], triggers, work, n, True, flags)
            log(f"{arch} N={n}: merging with the report ...")
            with_report = run_merge(argv, kill_above, args.timeout, os.path.join(work, f"report_{n}.json"))
            print_run_detail("with report", with_report)
            without = None
            if "--no-report" in flags:
                log(f"{arch} N={n}: merging with --no-report ...")
                without = run_merge(merge_argv(args, folder, loras[:n], triggers, work, n, False, flags),
                                    kill_above, args.timeout)
                print_run_detail("--no-report", without)
            else:
                print("    --no-report: skipped, the CLI does not accept it yet")
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        ok = with_report["rc"] == 0
        if out_of_memory(with_report):
            out_of_memory_at = n
        extra = with_report["peak_rss"] - model["rss"] if ok else None
        share = share_wall = None
        if ok and without is not None and without["rc"] == 0:
            if with_report["merge_s"] and without["merge_s"] is not None:
                share = (with_report["merge_s"] - without["merge_s"]) / with_report["merge_s"]
            share_wall = (with_report["wall_s"] - without["wall_s"]) / with_report["wall_s"]
        verdict = None
        if n <= TARGET_MAX_LORAS:
            verdict = "FAIL" if not ok or extra > target_gib * GIB else "pass"
        rows.append({
            "arch": arch, "width_scale": args.width_scale, "N": n,
            "model_gib": gib(model["rss"]), "peak_gib": gib(with_report["peak_rss"]) if ok else None,
            "merge_peak_gib": gib(with_report["merge_peak_rss"]) if ok else None,
            "extra_gib": gib(extra), "target_extra_gib": target_gib if n <= TARGET_MAX_LORAS else None,
            "verdict": verdict, "old_design_gib": old_design_bytes(targets, n) / GIB,
            "wall_s": with_report["wall_s"] if ok else None, "merge_s": with_report["merge_s"] if ok else None,
            "no_report_merge_s": without["merge_s"] if without and without["rc"] == 0 else None,
            "no_report_peak_gib": gib(without["peak_rss"]) if without and without["rc"] == 0 else None,
            "report_share": share, "report_share_wall": share_wall,
            "end_to_end_share": (with_report["seconds"] or {}).get("end_to_end", 0.0) / with_report["merge_s"]
            if ok and with_report["merge_s"] and with_report["seconds"] else None,
            "seconds": with_report["seconds"],
            "failure": None if ok else describe_failure(with_report),
            "no_report_failure": None if without is None or without["rc"] == 0 else describe_failure(without),
            "runs": {"report": with_report, "no_report": without},
        })
    return {"arch": arch, "model": model, "build_s": build_seconds, "rows": rows, "lora_count": len(loras)}


def skipped_row(arch, width_scale, n, model, targets, out_of_memory_at) -> dict:
    from full_width import old_design_bytes

    row = dict.fromkeys(key for key, *_ in COLUMNS)
    row.update(arch=arch, width_scale=width_scale, N=n, model_gib=gib(model["rss"]),
               target_extra_gib=TARGET_EXTRA_GIB[arch] if n <= TARGET_MAX_LORAS else None,
               verdict="FAIL" if n <= TARGET_MAX_LORAS else None, old_design_gib=old_design_bytes(targets, n) / GIB,
               seconds=None, failure=f"not run: N={out_of_memory_at} already ran out of memory", runs={})
    return row


COLUMNS = [  # (key, header, width, format)
    ("arch", "arch", 5, "s"), ("N", "N", 3, "d"), ("model_gib", "model", 6, ".2f"), ("peak_gib", "peak", 6, ".2f"),
    ("extra_gib", "+model", 7, ".2f"), ("target_extra_gib", "target", 7, ".0f"), ("verdict", "ok", 4, "s"),
    ("merge_peak_gib", "merge_pk", 8, ".2f"), ("old_design_gib", "old", 7, ".2f"), ("merge_s", "merge_s", 8, ".1f"),
    ("no_report_merge_s", "norep_s", 8, ".1f"), ("report_share", "rep%", 6, ".0%"), ("end_to_end_share", "e2e%", 6, ".0%"),
    ("no_report_peak_gib", "norep_pk", 8, ".2f"), ("wall_s", "wall_s", 7, ".1f"),
]
LEGEND = """\
GiB of RSS of the merge child. model: a child after load_base only; peak: the merge child's high-water mark;
+model: peak - model, against target (the rewrite's goal, for up to 12 LoRAs); merge_pk: peak from the first
progress update on (without load_base's transient); old: statistics the previous engine held, sum over targets
of N*D_in^2*8 (float64 Grams) + N*D_out*D_in*4 (dense fp32 deltas). merge_s: seconds from the first progress
update to exit, with the report; norep_s / norep_pk: the same run with --no-report (the end-to-end figure runs
in both); rep%: (merge_s - norep_s) / merge_s, the per-layer report's share; e2e%: the end-to-end figure's
seconds / merge_s; wall_s: the whole child (start, load_base, merge). seconds: the report JSON's "seconds"."""


def print_table(rows):
    print(" ".join(f"{header:>{width}}" for _, header, width, _ in COLUMNS))
    for row in rows:
        cells = []
        for key, _, width, spec in COLUMNS:
            value = row[key]
            text = "-" if value is None else format(value, spec)
            if key == "target_extra_gib" and value is not None:
                text = f"<=+{text}"
            cells.append(f"{text:>{width}}")
        print(" ".join(cells) + (f"  {row['failure']}" if row["failure"] else ""))
        if row["seconds"]:
            print(f"{'':>10}seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items()))


def print_old_design(arch, counts, scale):
    """Statistics the previous engine held, per N, and what the streaming engine plans: at the bench's width and at full width."""
    from full_width import meta_targets, old_design_bytes, planned_batches, planned_statistics

    shown = sorted(set(counts) | {TARGET_MAX_LORAS})
    widths = [scale] if scale == 1 else [scale, 1.0]
    for width in widths:
        targets = meta_targets(arch, width)
        figures = ", ".join(f"N={n}: {old_design_bytes(targets, n) / GIB:.1f}" for n in shown)
        print(f"  {arch} {'full width' if width == 1 else f'width x{width:g}'} ({len(targets)} targets): "
              f"old design statistics GiB {figures}")
        for n in shown:
            plan = planned_statistics(targets, n)
            stages = ", ".join(f"{stage} {held:.2f} GiB in {passes} pass{'es' if passes > 1 else ''}"
                               for stage, (held, passes) in plan.items())
            print(f"    streaming design, N={n}, rank 16, UNet worst case (every input folded), 4 GiB default budget: {stages}")
            native = 1024 if arch == "sdxl" else 512
            per_concept, batches = planned_batches(targets, arch, n, native)
            print(f"      at the native {native} px: about {per_concept:.2f} GiB of UNet activations per concept, so the "
                  f"{n} concepts sample in {len(batches)} batch{'es' if len(batches) > 1 else ''} of up to "
                  f"{max(len(b) for b in batches)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sd1, N = 2 and 4, 64 px, 2 steps")
    parser.add_argument("--arch", choices=("sd1", "sdxl", "both"), default=None, help="default sd1")
    parser.add_argument("--counts", default=None, help="numbers of LoRAs, e.g. 2,4,8,12 (default per arch)")
    parser.add_argument("--capture-size", type=int, default=64, help="image size the merge samples (px)")
    parser.add_argument("--capture-steps", type=int, default=2, help="sampling steps the merge captures")
    parser.add_argument("--method", default="loraclr", help="the CLI's --method (loraclr, lsq, sum, svd, distill)")
    parser.add_argument("--distill-iters", type=int, default=8,
                        help="--method distill: the CLI's --distill-iters (the bench reports seconds per step)")
    parser.add_argument("--distill-pair-trajectories", type=int, default=None,
                        help="--method distill: the CLI's --distill-pair-trajectories (composed pair images in the pool; "
                             "default: the CLI's)")
    parser.add_argument("--cache", default="/tmp/loraclr_bench_models", help="where models and LoRAs are built once")
    parser.add_argument("--max-memory", type=float, default=None, help="passed to the CLI's --max-memory (GiB)")
    parser.add_argument("--device", default="cpu", help="the CLI's --device (RSS then excludes GPU memory)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--kill-above", type=float, default=None,
                        help="kill a child whose RSS passes this many GiB (default: MemAvailable at start - 1 GiB)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each child (OMP_NUM_THREADS); 1 gives steadier times on a shared machine")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per child")
    parser.add_argument("--work-dir", default=None, help="where merged outputs go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the merged files and reports")
    parser.add_argument("--width-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # dev: shrink every width
    parser.add_argument("--_load-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_targets", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._load_only:
        load_only(args._load_only, args._targets)
        return 0
    if os.path.abspath(args.cache).startswith(REPO_ROOT + os.sep):
        parser.error("--cache must be outside the repository")
    arch_choice = args.arch or "sd1"
    archs = ["sd1", "sdxl"] if arch_choice == "both" else [arch_choice]
    if args.quick and args.arch is None:
        archs = ["sd1"]
    if args.counts:
        counts = {arch: [int(n) for n in args.counts.split(",")] for arch in archs}
    else:
        counts = {arch: [2, 4] if args.quick else DEFAULT_COUNTS[arch] for arch in archs}
    if any(n < 2 for values in counts.values() for n in values):
        parser.error("--counts: a merge needs at least 2 LoRAs")
    kill_above = int((args.kill_above * GIB) if args.kill_above else mem_available() - GIB)

    def log(message):
        print(message, flush=True)

    global CHILD_THREADS
    CHILD_THREADS = args.threads
    flags = cli_flags()
    import torch

    log(f"merge scale bench: torch {torch.__version__}, {os.cpu_count()} CPUs, capture {args.capture_size} px x "
        f"{args.capture_steps} steps, device {args.device}, {args.threads or 'default'} threads per child, children killed above {kill_above / GIB:.1f} GiB RSS"
        + ("" if args.width_scale == 1 else f"; WIDTH x{args.width_scale:g} (dev run: not the target models)"))
    if "--no-report" not in flags:
        log("note: this CLI has no --no-report yet: the runs without the report are skipped")
    if args.max_memory is not None and "--max-memory" not in flags:
        log(f"note: this CLI has no --max-memory yet: --max-memory {args.max_memory:g} is not passed")
    results = [bench_arch(args, arch, counts[arch], flags, kill_above, log) for arch in archs]

    rows = [row for result in results for row in result["rows"]]
    print("\nmerge scale: " + LEGEND)
    if args.width_scale != 1:
        print(f"width x{args.width_scale:g}: pass/fail only counts on the full-width models")
    print_table(rows)
    print("today's design vs the old one:")
    for arch in archs:
        print_old_design(arch, counts[arch], args.width_scale)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "cli_flags": sorted(flags),
                       "results": results}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if all(row["failure"] is None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
