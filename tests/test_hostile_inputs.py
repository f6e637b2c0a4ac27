"""Bad and hostile input at every boundary: one clear error each time, nothing allocated or written.

Every hostile file is built here, in tmp_path. Errors are compared word for word where the
message is the contract (field names, option names, file and key names); files that must
not change are compared by hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from lora_fixtures import SD1_SELF_ATTN_Q, lora_factors, write_file, write_kohya_file

from lib_loraclr.cli import main
from lib_loraclr.compose.concepts import LoraConcept, plan_concepts
from lib_loraclr.prompt import parse_prompt
from lib_loraclr.compose.engine import NonFiniteError, apply_emphasis, check_finite
from lib_loraclr.compose.session import ComposeRequest
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.lora.base import LoraFormatError
from lib_loraclr.lora.keys import kohya_key
from lib_loraclr.lora.lowrank import LowRank
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.lora.writer import KohyaWriter, safe_output_path, write_files, write_sidecar
from lib_loraclr.merge.objective import MergeSettings
from lib_loraclr.merge.pipeline import check_outputs, load_concepts
from lib_loraclr.validation import InputError
from lib_loraclr.webui.merge_service import MergeRequest
from lib_loraclr.webui.ui import merge_request_from_ui, request_from_args

Q = kohya_key(SD1_SELF_ATTN_Q, "sd1")  # lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def folder_state(folder) -> dict[str, str]:
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def good_lora(folder, name="good", trigger="sks cat") -> str:
    path = write_kohya_file(os.path.join(folder, f"{name}.safetensors"), {SD1_SELF_ATTN_Q: lora_factors(8, 8, 2, alpha=1)}, "sd1")
    write_sidecar(path, trigger, arch="sd1")
    return path


def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


# --- settings and requests: one typed, bounded model each ---------------------------------


@pytest.mark.parametrize("values, message", [
    ({"capture_size": 0}, "merge settings: capture_size: ensure this value is greater than or equal to 8"),
    ({"capture_size": 10**6}, "merge settings: capture_size: ensure this value is less than or equal to 2048"),
    ({"capture_size": -5}, "merge settings: capture_size: ensure this value is greater than or equal to 8"),
    ({"iters": 10**9}, "merge settings: iters: ensure this value is less than or equal to 10000"),
    ({"iters": 50.0}, "merge settings: iters: value is not a valid integer"),
    ({"report": "false"}, "merge settings: report: value is not a valid boolean"),
    ({"margin": "0.5"}, "merge settings: margin: must be a number"),
    ({"margin": True}, "merge settings: margin: must be a number"),
    ({"lr": math.nan}, "merge settings: lr: must be a finite number"),
    ({"max_memory_gb": math.inf}, "merge settings: max_memory_gb: must be a finite number"),
    ({"method": "magic"}, "merge settings: method: unexpected value; permitted: 'loraclr', 'lsq', 'sum', 'svd', 'distill'"),
    ({"speed": 1}, "merge settings: speed: unknown merge setting (known: method, solver, margin, lambda_con, "
                   "lambda_mse, lambda_reg, lr, weight_decay, iters, refine_iters, rank, energy, max_rank, "
                   "clamp_quantile, capture_steps, capture_size, seed, report, end_to_end, max_memory_gb, "
                   "prompt_template, distill_iters, distill_lr, distill_batch, distill_trajectories, "
                   "distill_pair_trajectories, distill_pair_weight, guidance_scale)"),
    ({"prompt_template": "photo of"}, "merge settings: prompt_template: must hold {} exactly once (where the trigger "
                                      "goes) and no other braces"),
    ({"prompt_template": 7}, "merge settings: prompt_template: str type expected"),
    ({"distill_lr": math.inf}, "merge settings: distill_lr: must be a finite number"),
    ({"distill_batch": 0}, "merge settings: distill_batch: ensure this value is greater than or equal to 1"),
    ({"distill_pair_trajectories": -1}, "merge settings: distill_pair_trajectories: ensure this value is greater "
                                         "than or equal to 0"),
    ({"distill_pair_weight": math.nan}, "merge settings: distill_pair_weight: must be a finite number"),
    ({"distill_pair_weight": -0.5}, "merge settings: distill_pair_weight: ensure this value is greater than or equal to 0"),
    ({"guidance_scale": 100}, "merge settings: guidance_scale: ensure this value is less than or equal to 30"),
])
def test_merge_settings_refuse_bad_values_by_name(values, message):
    with pytest.raises(InputError) as error:
        MergeSettings(**values)
    assert str(error.value) == message


def test_merge_settings_keep_good_values_and_take_ints_for_floats():
    settings = MergeSettings(margin=1, capture_size=64, rank=4, max_memory_gb=0.5)
    assert settings.margin == 1.0 and isinstance(settings.margin, float) and settings.capture_size == 64


@pytest.mark.parametrize("payload, message", [
    ({"overwrite": "false"}, "merge request: overwrite: value is not a valid boolean"),
    ({"triggers": "ab"}, "merge request: triggers: value is not a valid list"),
    ({"triggers": [1, 2]}, "merge request: triggers.0: str type expected; triggers.1: str type expected"),
    ({"weights": [1.0, math.nan]}, "merge request: weights.1: must be a finite number"),
    ({"weights": [1.0, 1e30]}, "merge request: weights.1: ensure this value is less than or equal to 10"),
    ({"output": "a\nb"}, "merge request: output: must not hold control or invisible formatting characters "
                         "(newlines, U+202E...)"),
    ({"settings": {"iters": 1e9}}, "merge request: settings.iters: value is not a valid integer"),
    ({"settings": "fast"}, "merge request: settings: instance of MergeSettings, tuple or dict expected"),
    ({"colour": 1}, "merge request: colour: unknown merge request key (known: loras, triggers, output, weights, "
                    "settings, overwrite)"),
    ({"settings": {"prompt_template": "a {} and {}"}}, "merge request: settings.prompt_template: must hold {} "
                                                         "exactly once (where the trigger goes) and no other braces"),
    ({"loras": ["a"] * 40, "triggers": ["t"] * 40}, "merge request: at most 32 LoRAs can be merged at once, got 40"),
])
def test_merge_request_is_typed_before_anything_runs(payload, message):
    values = {"loras": ["a", "b"], "triggers": ["sks", "zqx"], "output": "out", **payload}
    with pytest.raises(InputError) as error:
        MergeRequest.from_dict(values)
    assert str(error.value) == message


def test_merge_request_from_a_non_object_and_without_fields():
    with pytest.raises(InputError, match="expected an object with named fields, got list"):
        MergeRequest.from_dict(["a", "b"])
    with pytest.raises(InputError, match="triggers: missing; output: missing"):
        MergeRequest.from_dict({"loras": ["a", "b"]})


@pytest.mark.parametrize("payload, message", [
    ({"show_masks": "false"}, "composition request: show_masks: value is not a valid boolean"),
    ({"concepts": [{"lora": "cat", "words": "cat", "weight": math.nan}]},
     "composition request: concepts.0.weight: must be a finite number"),
    ({"concepts": [{"lora": "cat", "words": "cat", "weight": 1e30}]},
     "composition request: concepts.0.weight: ensure this value is less than or equal to 10"),
    ({"concepts": [{"lora": 3, "words": "cat"}]}, "composition request: concepts.0.lora: str type expected"),
    ({"settings": {"step_size": math.inf}}, "composition request: settings.step_size: must be a finite number"),
    ({"settings": {"refinement_iters": 1e9}}, "composition request: settings.refinement_iters: value is not a valid integer"),
    ({"settings": {"refinement_iters": 10**9}},
     "composition request: settings.refinement_iters: ensure this value is less than or equal to 100"),
    ({"concepts": [{"lora": f"l{i}", "words": f"w{i}"} for i in range(5)]}, "composition request: at most 4 subjects, got 5"),
])
def test_composition_request_is_typed(payload, message):
    values = {"concepts": [{"lora": "cat", "words": "cat"}], **payload}
    with pytest.raises(ValueError) as error:
        request_from_args([{"enabled": True, **values}])
    assert str(error.value) == message


def test_composition_enabled_must_be_a_boolean_in_both_argument_forms():
    for args in ([{"enabled": "false", "concepts": [{"lora": "cat", "words": "cat"}]}],
                 ["false"] + [""] * 32):
        with pytest.raises(InputError) as error:
            request_from_args(args)
        assert str(error.value) == "composition request: enabled: value is not a valid boolean"
    with pytest.raises(ValueError, match="takes one object or 33 values, got 3"):
        request_from_args([True, "cat", "cat"])


def test_infotext_that_is_not_json_is_a_clear_error():
    with pytest.raises(ValueError, match="the LoRACLR infotext field is not valid JSON"):
        ComposeRequest.from_infotext("{" * 100_000)
    with pytest.raises(ValueError, match="the LoRACLR infotext field is not valid JSON"):
        ComposeRequest.from_infotext('{"concepts": NaN')


def test_tab_values_are_checked_not_converted():
    with pytest.raises(InputError, match="merge request: settings.iters: value is not a valid integer"):
        merge_request_from_ui([["a", "x", 1], ["b", "y", 1]], "loraclr", "out", 0, False, {"iters": 1.5})
    with pytest.raises(InputError, match="weights.1: must be a finite number"):
        merge_request_from_ui([["a", "x", 1], ["b", "y", "nan"]], "loraclr", "out", 0, False, {})


# --- LoRA files that cannot be read -------------------------------------------------------


def _read_error(path) -> str:
    with pytest.raises(LoraFormatError) as error:
        read_lora(str(path))
    return str(error.value)


def test_loha_and_lokr_bombs_are_refused_before_allocating(tmp_path):
    """Under 1 MiB on disk, 17 GB as a dense delta: refused from the declared shapes alone."""
    loha = {f"{Q}.hada_w{n}_{side}": torch.full(shape, 0.01, dtype=torch.float16)
            for n in (1, 2) for side, shape in (("a", (65536, 1)), ("b", (1, 65536)))}
    path = write_file(tmp_path / "loha.safetensors", loha)
    assert os.path.getsize(path) < 2**20
    assert _read_error(path) == (f"loha.safetensors: key {Q!r}: tensor shapes do not fit (its delta would have shape "
                                 "(65536, 65536) (4.29e+09 weights), more than any SD layer (6.71e+07))")
    lokr = {f"{Q}.lokr_w1": torch.ones(256, 256) * 0.01, f"{Q}.lokr_w2": torch.ones(256, 256) * 0.01}
    assert "its delta would have shape (65536, 65536)" in _read_error(write_file(tmp_path / "lokr.safetensors", lokr))


@pytest.mark.parametrize("tensors, reason", [
    ({f"{Q}.lora_up.weight": torch.zeros(8, 0), f"{Q}.lora_down.weight": torch.zeros(0, 8)},
     "lora_up.weight has shape (8, 0): an empty dimension (rank 0?)"),
    ({f"{Q}.lora_up.weight": torch.ones(8), f"{Q}.lora_down.weight": torch.ones(8)},
     "lora_up.weight has shape (8,); expected 2-D or 4-D"),
    ({f"{Q}.lora_up.weight": torch.tensor(1.0), f"{Q}.lora_down.weight": torch.ones(1, 8)},
     "lora_up.weight has shape (); expected 2-D or 4-D"),
    ({f"{Q}.lora_up.weight": torch.ones(8, 2, 3, 3), f"{Q}.lora_down.weight": torch.ones(2, 8, 3, 3)},
     "up (8, 2, 3, 3), down (2, 8, 3, 3) do not chain"),
    ({f"{Q}.hada_w1_a": torch.ones(8, 1), f"{Q}.hada_w1_b": torch.ones(1, 1), f"{Q}.hada_w2_a": torch.ones(1, 1),
      f"{Q}.hada_w2_b": torch.ones(1, 8)}, "the two Hadamard factors have shapes (8, 1) and (1, 8)"),
    ({f"{Q}.lora_up.weight": torch.ones(8, 2), f"{Q}.lora_down.weight": torch.ones(2, 8), f"{Q}.alpha": torch.tensor(-1.0)},
     "alpha must be one positive number, got -1.0"),
    ({f"{Q}.lora_up.weight": torch.ones(8, 2), f"{Q}.lora_down.weight": torch.ones(2, 8), f"{Q}.alpha": torch.ones(2)},
     "alpha must be one positive number, got [1.0, 1.0]"),
    ({f"{Q}.lora_up.weight": torch.full((8, 2), 6e4, dtype=torch.float16),
      f"{Q}.lora_down.weight": torch.full((2, 8), 6e4, dtype=torch.float16)},
     "its weight change could reach 7.2e+09 per weight, far beyond any model's weights (at most 10000 is accepted): "
     "a corrupt file?"),
])
def test_malformed_modules_name_file_key_and_reason(tmp_path, tensors, reason):
    assert _read_error(write_file(tmp_path / "bad.safetensors", tensors)) == (
        f"bad.safetensors: key {Q!r}: tensor shapes do not fit ({reason})")


@pytest.mark.parametrize("role, tensor, reason", [
    ("lora_up.weight", torch.tensor([[math.nan, 0.0]] * 8), "holds NaN or infinite values"),
    ("lora_down.weight", torch.tensor([[math.inf] * 8] * 2), "holds NaN or infinite values"),
    ("alpha", torch.tensor(math.inf), "holds NaN or infinite values"),
    ("lora_up.weight", torch.ones(8, 2, dtype=torch.bool), "holds bool values; LoRA factors are floating-point"),
    ("lora_up.weight", torch.ones(8, 2, dtype=torch.int64), "holds int64 values; LoRA factors are floating-point"),
])
def test_non_finite_and_non_float_tensors_are_refused_when_read(tmp_path, role, tensor, reason):
    tensors = {f"{Q}.lora_up.weight": torch.ones(8, 2), f"{Q}.lora_down.weight": torch.ones(2, 8), f"{Q}.{role}": tensor}
    assert _read_error(write_file(tmp_path / "nan.safetensors", tensors)) == f"nan.safetensors: key '{Q}.{role}' {reason}"


def test_absurd_header_length_is_refused(tmp_path):
    path = tmp_path / "header.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    assert _read_error(path) == ("header.safetensors: not a readable safetensors file (its header claims "
                                 "1099511627776 bytes, more than the 32 MiB a LoRA header needs)")


def test_unusable_training_tags_give_no_triggers_not_a_traceback(tmp_path):
    factors = {SD1_SELF_ATTN_Q: lora_factors(8, 8, 2)}
    for name, tags in (("nan", '{"a": {"sks": NaN, "dog": 2}}'), ("inf", '{"a": {"sks": Infinity}}'),
                       ("deep", "[" * 200_000 + "]" * 200_000), ("odd", '{"a": {"sks": "many", "dog": 2}}')):
        path = write_kohya_file(tmp_path / f"{name}.safetensors", factors, "sd1", {"ss_tag_frequency": tags})
        assert read_lora(path).triggers == (["dog"] if name == "odd" else [])


def test_oversized_sidecar_and_hostile_adapter_config(tmp_path):
    path = good_lora(tmp_path)
    (tmp_path / "good.json").write_bytes(b'{"activation text": "' + b"x" * (20 * 2**20) + b'"}')
    assert _read_error(path) == ("good.safetensors: its sidecar good.json is larger than 1024 KiB; "
                                 "a sidecar holds a few lines of metadata")
    peft = tmp_path / "peft"
    peft.mkdir()
    weights = write_file(peft / "adapter_model.safetensors", {
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2),
    })
    for config, reason in (({"lora_alpha": "8", "r": 2}, "lora_alpha must be a positive number, got '8'"),
                           ({"lora_alpha": 8, "r": 2, "alpha_pattern": {"(": 1}}, "pattern '(' is not a usable pattern")):
        (peft / "adapter_config.json").write_text(json.dumps(config))
        assert reason in _read_error(weights)


def test_inspect_of_hostile_files_is_one_line_exit_2(tmp_path, capsys):
    bomb = write_file(tmp_path / "bomb.safetensors", {f"{Q}.lokr_w1": torch.ones(256, 256), f"{Q}.lokr_w2": torch.ones(256, 256)})
    code, err = cli(capsys, "inspect", bomb)
    assert code == 2 and err.startswith("error: bomb.safetensors: key ") and err.count("\n") == 1
    assert "Traceback" not in err


# --- outputs: checked before any work, never an input, all or nothing ---------------------


def test_merge_refuses_outputs_before_loading_the_model(tmp_path, capsys):
    """--base does not exist: each refusal below must come before the model is loaded."""
    a, b = good_lora(tmp_path, "a", "sks cat"), good_lora(tmp_path, "b", "zqx dog")
    before = folder_state(tmp_path)
    common = ["merge", "--base", str(tmp_path / "no_base"), "--lora", a, "--lora", b]
    cases = [
        (["--out", str(tmp_path / "m.safetensors"), "--report", str(tmp_path / "missing" / "r.json")],
         f"error: report folder {tmp_path / 'missing'} does not exist"),
        (["--out", a, "--overwrite"],
         f"error: the output {a} is one of the inputs (a.safetensors), which are never replaced, even with "
         "overwriting allowed: choose another name"),
        (["--out", str(tmp_path / "x.safetensors"), "--report", str(tmp_path / "a.json"), "--overwrite"],
         f"error: the report {tmp_path / 'a.json'} is one of the inputs (a.json), which are never replaced, "
         "even with overwriting allowed: choose another name"),
        (["--out", str(tmp_path / "x.safetensors"), "--report", str(tmp_path / "x.json")],
         f"error: the report {tmp_path / 'x.json'} and the sidecar are the same file; give them different names"),
        (["--out", str(tmp_path / "a.json.safetensors"), "--report", str(tmp_path / "b.json")],
         f"error: {tmp_path / 'b.json'} already exists; choose another name or allow overwriting"),
        (["--out", str(tmp_path / ".safetensors")], "error: invalid output file name '.safetensors'"),
        (["--out", str(tmp_path / "a\nb.safetensors")], "error: invalid output file name 'a\\nb.safetensors'"),
        (["--out", str(tmp_path / "evil\u202egnp.safetensors")], "error: invalid output file name 'evil\\u202egnp.safetensors'"),
        (["--out", str(tmp_path / ("n" * 230 + ".safetensors"))], "error: invalid output file name 'nnnnnnnn"),
        (["--out", str(tmp_path / "m.safetensors"), "--trigger", "", "--trigger", "zqx"],
         f"error: {a}: its trigger words are empty; each LoRA needs the words that call up its concept"),
        (["--out", str(tmp_path / "m.safetensors"), "--weight", "nan", "--weight", "1"],
         "error: LoRA 1 (a.safetensors): weight: must be a finite number"),
        (["--out", str(tmp_path / "m.safetensors"), "--capture-size", "0"],
         "error: --capture-size: ensure this value is greater than or equal to 8"),
        (["--out", str(tmp_path / "m.safetensors"), "--iters", "1000000000"],
         "error: --iters: ensure this value is less than or equal to 10000"),
        (["--out", str(tmp_path / "m.safetensors"), "--max-memory", "inf"], "error: --max-memory: must be a finite number"),
        (["--out", str(tmp_path / "m.safetensors"), "--distill-pair-trajectories", "65"],
         "error: --distill-pair-trajectories: ensure this value is less than or equal to 64"),
        (["--out", str(tmp_path / "m.safetensors"), "--distill-pair-weight", "11"],
         "error: --distill-pair-weight: ensure this value is less than or equal to 10"),
    ]
    for extra, message in cases:
        code, err = cli(capsys, *common, *extra)
        assert code == 2, extra
        assert err.startswith(message) and err.count("\n") == 1, (extra, err)
    assert folder_state(tmp_path) == before


def test_write_files_is_all_or_nothing(tmp_path, monkeypatch):
    old = tmp_path / "old.bin"
    old.write_bytes(b"previous")
    before = folder_state(tmp_path)
    real_replace = os.replace
    calls = []

    def failing_replace(source, target):
        calls.append(target)
        if str(target).endswith("c.bin"):
            raise PermissionError(13, "Permission denied", source)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    files = {str(tmp_path / "new.bin"): b"n", str(old): b"replaced", str(tmp_path / "c.bin"): b"c"}
    with pytest.raises(OSError) as error:
        write_files(files, overwrite=True)
    assert str(error.value) == f"cannot write {tmp_path / 'c.bin'}: Permission denied"  # the real name, not a temp file
    assert folder_state(tmp_path) == before  # old content back, nothing new, no temp files
    monkeypatch.setattr(os, "replace", real_replace)
    write_files(files, overwrite=True)
    assert old.read_bytes() == b"replaced" and sorted(os.listdir(tmp_path)) == ["c.bin", "new.bin", "old.bin"]


def test_writer_refuses_non_finite_or_overflowing_merged_deltas(tmp_path):
    writer = KohyaWriter("sd1")
    with pytest.raises(ValueError, match=f"the merged delta of layer {SD1_SELF_ATTN_Q} is not finite"):
        writer.add(SD1_SELF_ATTN_Q, torch.full((8, 8), math.nan))
    writer.add(SD1_SELF_ATTN_Q, LowRank(torch.full((8, 1), 1e4), torch.full((1, 8), 1e4)))
    with pytest.raises(ValueError, match=f"the merged delta of layer {SD1_SELF_ATTN_Q} does not fit float16"):
        writer.seal()


def test_safe_output_names():
    assert safe_output_path("/x", "my merge (v2)") == "/x/my merge (v2).safetensors"
    for bad in (".", "..", "a\nb", "a\u202eb", "-rf", "trailing.", "con", "n" * 201, "a\tb", "zero\u200bwidth"):
        with pytest.raises(ValueError, match="invalid output file name"):
            safe_output_path("/x", bad)


def test_empty_trigger_is_an_error_not_replaced_from_the_sidecar(tmp_path):
    paths = [good_lora(tmp_path, "a", "sks cat"), good_lora(tmp_path, "b", "zqx dog")]
    assert [c.trigger for c in load_concepts(paths, None)] == ["sks cat", "zqx dog"]
    assert [c.trigger for c in load_concepts(paths, [None, " wld "])] == ["sks cat", "wld"]
    with pytest.raises(ValueError, match="its trigger words are empty"):
        load_concepts(paths, ["  ", "zqx"])


def test_outputs_are_checked_as_a_set(tmp_path):
    lora = good_lora(tmp_path, "in")
    out = str(tmp_path / "out.safetensors")
    assert check_outputs(out, False, str(tmp_path / "out.report.json"), [lora]) == [
        out, str(tmp_path / "out.json"), str(tmp_path / "out.report.json")]
    link = tmp_path / "link.safetensors"
    link.symlink_to(lora)
    with pytest.raises(ValueError, match="is one of the inputs"):
        check_outputs(str(link), True, None, [lora])


# --- the CLI: one line, exit codes, --debug, Ctrl-C, devices --------------------------------


def test_cli_ctrl_c_debug_and_internal_errors(tmp_path, capsys, monkeypatch):
    import lib_loraclr.lora.reader as reader

    lora = good_lora(tmp_path)

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "read_lora", interrupted)
    assert cli(capsys, "inspect", lora) == (130, "cancelled: nothing was written\n")

    def broken(path):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(reader, "read_lora", broken)
    assert cli(capsys, "inspect", lora) == (2, "error: RuntimeError: boom second line (run with --debug for the traceback)\n")
    code, err = cli(capsys, "inspect", lora, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and err.endswith("(run with --debug for the traceback)\n")
    code, err = cli(capsys, "--debug", "inspect", lora)
    assert code == 2 and "Traceback" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_without_cuda_is_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["merge", "--base", "b", "--lora", "a", "--out", "o.safetensors", "--device", "cuda"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --device: 'cuda': CUDA is not available") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["compose", "--base", "b", "--lora", "a", "--prompt", "p", "--out", "o.png", "--device", "gpu9"])
    assert "error: argument --device: 'gpu9' is not a device" in capsys.readouterr().err


def test_compose_cli_options_are_bounded_before_loading(tmp_path, capsys):
    lora = good_lora(tmp_path)
    common = ["compose", "--base", str(tmp_path / "no_base"), "--lora", lora, "--words", "cat", "--prompt", "a cat"]
    for extra, message in (
        (["--out", str(tmp_path / "x.png"), "--step-size", "inf"], "error: --step-size: must be a finite number"),
        (["--out", str(tmp_path / "x.png"), "--steps", "100000"], "error: --steps: ensure this value is less than or equal to 1000"),
        (["--out", str(tmp_path / "x.png"), "--layout-steps", "-1"], "error: --layout-steps: ensure this value is greater than or equal to 0"),
        (["--out", str(tmp_path / "x.png"), "--size", "100000"], "error: --size: ensure this value is less than or equal to 2048"),
        (["--out", str(tmp_path / "x.png"), "--save-masks", str(tmp_path / "x.png")],
         f"error: the masks {tmp_path / 'x.png'} and the image are the same file"),
        (["--out", str(tmp_path / "good.safetensors"), "--overwrite"],
         f"error: the image {tmp_path / 'good.safetensors'} is one of the inputs"),
    ):
        code, err = cli(capsys, *common, *extra)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, (extra, err)


# --- composition: emphasis applied, embeddings refused, no silent black image -------------


def test_emphasis_is_applied_like_a1111(tiny_sd1):
    plan = plan_concepts("a (cat:1.5) and a [dog]", [LoraConcept("cat"), LoraConcept("dog")], tiny_sd1.tokenizer)
    weights = plan.passes[0].token_weights
    assert weights == (1.0, 1.5, 1.0, 1.0, 1 / 1.1)
    context = tiny_sd1.encode([plan.passes[0].clean_prompt]).context + 0.5  # a mean that is not rounding noise
    weighted = apply_emphasis(context, weights)
    multipliers = torch.tensor([1.0, 1.0, 1.5, 1.0, 1.0, 1 / 1.1] + [1.0] * (context.shape[1] - 6))
    expected = context * multipliers[None, :, None]
    expected = expected * (context.mean() / expected.mean())
    assert torch.allclose(weighted, expected)
    assert apply_emphasis(context, (1.0,) * 5) is context


def test_emphasis_reaches_every_pass(tiny_sd1):
    from lib_loraclr.compose.engine import encode_passes
    from lib_loraclr.runtime import LoraRuntime

    def encode(prompts):  # the tiny model's final LayerNorm has no bias: its states average 0, unlike a checkpoint's
        cond = tiny_sd1.encode(prompts)
        cond.context = cond.context + 0.5
        return cond

    concepts = [LoraConcept("cat", "sks"), LoraConcept("dog")]
    plain = plan_concepts("a cat and a dog", concepts, tiny_sd1.tokenizer)
    weighted = plan_concepts("a cat and a (dog:1.3)", concepts, tiny_sd1.tokenizer)
    with LoraRuntime(tiny_sd1.targets(), []) as runtime:
        a = encode_passes(encode, runtime, plain, [frozenset()] * 3)
        b = encode_passes(encode, runtime, weighted, [frozenset()] * 3)
    for p in range(3):
        assert not torch.allclose(a.conds[p].context, b.conds[p].context)
        assert torch.equal(a.unconds[p].context, b.unconds[p].context)
        assert torch.allclose(b.conds[p].context, apply_emphasis(a.conds[p].context, weighted.passes[p].token_weights))
    with LoraRuntime(tiny_sd1.targets(), []) as runtime:  # mean ~1e-9 (rounding): weighted, not divided by it
        a = encode_passes(tiny_sd1.encode, runtime, plain, [frozenset()] * 3)
        b = encode_passes(tiny_sd1.encode, runtime, weighted, [frozenset()] * 3)
    for p in range(3):
        weights = weighted.passes[p].token_weights
        multipliers = torch.tensor([1.0, *weights] + [1.0] * (a.conds[p].context.shape[1] - 1 - len(weights)))
        assert 1.3 in weights
        assert torch.allclose(b.conds[p].context, a.conds[p].context * multipliers[None, :, None])


def test_emphasis_that_splits_a_word_and_embeddings_are_refused(tiny_sd1):
    with pytest.raises(ValueError, match="an emphasis bracket or weight splits a word"):
        parse_prompt("a (cat)s and a dog", tiny_sd1.tokenizer)
    with pytest.raises(ValueError, match="uses the textual-inversion embedding 'mystyle'"):
        plan_concepts("a cat in mystyle", [LoraConcept("cat")], tiny_sd1.tokenizer, embeddings=["mystyle"])
    assert plan_concepts("a cat in oil", [LoraConcept("cat")], tiny_sd1.tokenizer, embeddings=["mystyle"])
    with pytest.raises(ValueError, match="the prompt has 1000003 characters"):
        parse_prompt("cat" + "(" * 10**6, tiny_sd1.tokenizer)


def test_non_finite_latent_or_prediction_stops_with_a_message():
    check_finite(torch.zeros(2), "x")
    with pytest.raises(NonFiniteError, match="the latent after step 3's update holds NaN or infinite values, so the "
                                             "image would be black"):
        check_finite(torch.tensor([0.0, math.nan]), "the latent after step 3's update")


def test_engine_refuses_a_black_image(tiny_sd1):
    from lib_loraclr.compose.attention import cross_attention_modules
    from lib_loraclr.compose.engine import ComposeEngine, encode_passes
    from lib_loraclr.runtime import LoraRuntime

    plan = plan_concepts("a cat and a dog", [LoraConcept("cat"), LoraConcept("dog")], tiny_sd1.tokenizer)
    settings = ComposeSettings(method="clora", attention_res_divisor=16, use_latent_update=False, use_masks=False)
    with LoraRuntime(tiny_sd1.targets(), []) as runtime:
        sets = [frozenset()] * len(plan.passes)
        conditioning = encode_passes(tiny_sd1.encode, runtime, plan, sets)
        engine = ComposeEngine(plan, settings, runtime, sets, cross_attention_modules(tiny_sd1.unet), 4)
        latent = torch.zeros(1, 4, 8, 8)

        def overflowing_unet(rows, timestep, cond):
            return torch.full_like(rows, math.inf)

        with pytest.raises(NonFiniteError, match="the model's prediction at step 0 holds NaN"):
            engine.step(0, latent, torch.tensor(500), conditioning, overflowing_unet)
        with pytest.raises(NonFiniteError, match="the latent the sampler passed in holds NaN"):
            engine.step(1, torch.full_like(latent, math.nan), torch.tensor(500), conditioning, tiny_sd1.unet_eps)


def test_a_failed_job_shows_a_traceback_only_for_internal_errors():
    from lib_loraclr.jobs import JobManager

    jobs = JobManager()

    def bad_input(progress):
        raise ValueError("the merged delta of layer x is not finite (NaN or Inf): nothing was written")

    def bug(progress):
        raise RuntimeError("internal")

    status = jobs.wait(jobs.start(bad_input), 30)
    assert status.state == "failed" and status.error == (
        "ValueError: the merged delta of layer x is not finite (NaN or Inf): nothing was written")
    assert not any("Traceback" in line for line in status.log)
    assert any("Traceback" in line for line in jobs.wait(jobs.start(bug), 30).log)
