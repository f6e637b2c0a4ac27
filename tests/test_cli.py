"""The command line as a user types it: inspect, merge, demo."""

import os
import subprocess
import sys

import torch

from lib_loraclr.cli import main
from lib_loraclr.demo import DEMO_CONCEPTS, fresh_folder, run_demo
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.lora.writer import write_kohya_lora
from lib_loraclr.tiny import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inspect_and_merge_commands(tmp_path, capsys):
    base = str(tmp_path / "base")
    save_tiny_model(base, "sd1", seed=1)
    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    from lib_loraclr.hosts.diffusers import load_base

    shape = load_base(base).targets()[target].weight.shape
    loras = []
    for index in range(2):
        path = str(tmp_path / f"c{index}.safetensors")
        write_kohya_lora(path, {target: torch.randn(*shape) * 0.1}, "sd1", rank=2)
        loras.append(path)

    listing = subprocess.run([sys.executable, "-m", "lib_loraclr", "inspect", loras[0]], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    assert "kohya" in listing.stdout and "sd1" in listing.stdout

    out = str(tmp_path / "merged.safetensors")
    args = ["merge", "--base", base, "--lora", loras[0], "--trigger", "zqx", "--lora", loras[1],
            "--trigger", "vbk", "--out", out, "--capture-size", "64", "--capture-steps", "2"]
    assert main(args) == 0
    assert set(read_lora(out).modules) == {target}
    assert "wrote" in capsys.readouterr().out

    assert main(args) == 2, "a second run must refuse to overwrite"
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_every_command_has_help(capsys):
    for command in ("inspect", "merge", "compose", "demo"):
        try:
            main([command, "--help"])
        except SystemExit as stop:
            assert stop.code == 0
        assert "usage:" in capsys.readouterr().out


def test_demo_writes_every_method(tmp_path, capsys):
    out = str(tmp_path / "demo")
    summaries = run_demo(out)
    assert set(summaries) == {"sum", "svd", "lsq", "loraclr", "distill"}
    files = os.listdir(out)
    for method in summaries:
        assert f"merged_{method}.safetensors" in files
        assert f"merged_{method}.report.json" in files
    for name, _ in DEMO_CONCEPTS:
        assert f"{name}.safetensors" in files and f"{name}.json" in files
    printed = capsys.readouterr().out
    assert "retention" in printed and "loraclr" in printed
    # a second run (run_demo's first step) gets a new folder and keeps the first one's files
    assert fresh_folder(out) == out + "-2" and os.path.isdir(out + "-2")
    assert sorted(os.listdir(out)) == sorted(files)
