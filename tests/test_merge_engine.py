"""The merge end to end on a tiny SD1 model: files in, one LoRA file out, report, refusals."""

import json
import os
import threading

import pytest
import torch
from lora_fixtures import loha_factors, lora_factors, write_diffusers_file, write_kohya_file
from safetensors import safe_open

from lib_loraclr.cli import main
from lib_loraclr.demo import concept_deltas
from lib_loraclr.hosts.diffusers import load_base
from lib_loraclr.jobs import JobManager
from lib_loraclr.lora.base import LoraFile
from lib_loraclr.lora.reader import read_lora
from lib_loraclr.lora.writer import KohyaWriter, write_kohya_lora, write_sidecar
from lib_loraclr.merge.capture import StatsCollector, layer_matrix
from lib_loraclr.merge.engine import LoraclrMerge, MergeInputError
from lib_loraclr.merge.memory import activation_bytes
from lib_loraclr.merge.objective import MergeSettings, exact_loss
from lib_loraclr.merge.pipeline import load_concepts, merge_to_file
from lib_loraclr.merge.solvers import solve_fast, solve_reference
from lib_loraclr.progress import MergeCancelled, Progress
from lib_loraclr.runtime import LoraRuntime
from lib_loraclr.tiny import save_tiny_model

TRIGGERS = ("zqx fox", "vbk robot", "plm vase")
SIZE = 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny_sd1"
    save_tiny_model(str(folder), "sd1", seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def model(base_dir):
    return load_base(base_dir)


@pytest.fixture(scope="module")
def lora_paths(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = []
    for seed, trigger in enumerate(TRIGGERS, start=1):
        path = str(folder / f"concept{seed}.safetensors")
        write_kohya_lora(path, concept_deltas(model, seed), model.arch, rank=4)
        write_sidecar(path, trigger)
        paths.append(path)
    return paths


def model_outputs(model):
    cond = model.encode(["a photo of a cat"])
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return cond.context.clone(), model.unet_eps(latent, torch.tensor([500]), cond)


def test_sum_is_lossless_stacking(model, lora_paths, tmp_path):
    concepts = load_concepts(lora_paths[:2], None)
    assert [c.trigger for c in concepts] == list(TRIGGERS[:2]), "triggers come from the sidecars"
    out = str(tmp_path / "sum.safetensors")
    merge_to_file(model, concepts, MergeSettings(method="sum", capture_size=SIZE, report=False), out)
    written = read_lora(out)
    for target in written.modules:
        expected = sum(c.lora.modules[target].delta_weight() for c in concepts if target in c.lora.modules)
        error = (written.modules[target].delta_weight() - expected).norm() / expected.norm()
        assert error < 2e-3, f"{target}: stacking should be exact up to fp16 storage, error {error}"


def test_loraclr_beats_sum_on_crosstalk_and_writes_everything(model, lora_paths, tmp_path):
    before = model_outputs(model)
    concepts = load_concepts(lora_paths, None)
    out = str(tmp_path / "merged.safetensors")
    report = str(tmp_path / "merged.report.json")
    summary = merge_to_file(model, concepts, MergeSettings(capture_size=SIZE), out, report_path=report)

    after = model_outputs(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the merge must leave the model untouched"

    quality = summary["quality"]
    for concept in concepts:
        ours, stacked = quality["loraclr"][concept.lora.name]["overall"], quality["sum"][concept.lora.name]["overall"]
        assert ours["crosstalk"] < stacked["crosstalk"]
    with open(report) as handle:
        assert json.load(handle)["quality"] == json.loads(json.dumps(quality))

    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_output_name"] == "merged"
    assert metadata["loraclr_method"] == "loraclr"
    assert [i["trigger"] for i in json.loads(metadata["loraclr_inputs"])] == list(TRIGGERS)
    for concept in concepts:
        with safe_open(concept.lora.path, "pt") as handle:
            assert handle.metadata()["sshs_model_hash"] != metadata["sshs_model_hash"]
    with open(out[: -len(".safetensors")] + ".json") as handle:
        activation = json.load(handle)["activation text"]
    assert all(trigger in activation for trigger in TRIGGERS)


def test_fast_solver_not_worse_than_reference_on_captured_features(model, lora_paths):
    concepts = load_concepts(lora_paths[:2], None)
    settings = MergeSettings(solver="reference", capture_size=SIZE, capture_steps=2, iters=10)
    merge = LoraclrMerge(model, concepts, settings)
    targets = dict(list(merge.targets_of("text_encoder").items())[:6])
    factors = {target: merge.factors(target) for target in targets}
    raw = StatsCollector(targets, factors, 2, mode="raw")
    streamed = StatsCollector(targets, factors, 2)
    for collector in (raw, streamed):
        merge.capture("text_encoder", collector, "test")
    for target, module in targets.items():
        base = layer_matrix(module)
        inputs = raw.raw(target)
        deltas = [None if f is None else f.dense() for f in factors[target]]
        fast_delta, _ = solve_fast(streamed.stats[target], factors[target], settings)
        reference_delta, _ = solve_reference(base, inputs, factors[target], settings)
        fast_loss = exact_loss(fast_delta.dense(), base, inputs, deltas, settings)
        reference_loss = exact_loss(reference_delta.dense(), base, inputs, deltas, settings)
        assert fast_loss <= reference_loss * (1 + 1e-5)
    assert len(targets) == 6


def test_refuses_existing_output_before_any_work(model, lora_paths, tmp_path):
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"precious")
    concepts = load_concepts(lora_paths[:2], None)
    with pytest.raises(FileExistsError):
        merge_to_file(model, concepts, MergeSettings(method="sum", capture_size=SIZE), str(out))
    assert out.read_bytes() == b"precious"


def test_wrong_architecture_and_missing_trigger_are_clear(model, tmp_path):
    wrong = str(tmp_path / "wide.safetensors")
    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert target in model.targets()
    write_kohya_lora(wrong, {target: torch.randn(7, 5)}, "sd1", rank=2)
    concepts = load_concepts([wrong, wrong], ["a", "b"])
    with pytest.raises(MergeInputError, match="shape"):
        LoraclrMerge(model, concepts, MergeSettings())
    with pytest.raises(ValueError, match="no trigger"):
        load_concepts([wrong], None)


def test_cancelled_job_writes_nothing(model, lora_paths, tmp_path):
    out = str(tmp_path / "cancelled.safetensors")
    concepts = load_concepts(lora_paths[:2], None)
    started = threading.Event()

    def work(progress: Progress):
        def listener(state):
            if state.stage == "sampling":
                started.set()
                progress.cancel()

        progress.listeners.append(listener)
        return merge_to_file(model, concepts, MergeSettings(capture_size=SIZE), out, progress=progress)

    jobs = JobManager()
    job_id = jobs.start(work)
    status = jobs.wait(job_id, timeout=300)
    assert started.is_set()
    assert status.state == "cancelled"
    assert not os.path.exists(out)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("cancelled")]


def test_cancel_flag_stops_the_engine():
    progress = Progress()
    progress.cancel()
    with pytest.raises(MergeCancelled):
        progress.update("load", 0, 1)


def test_merged_file_loads_in_diffusers_and_reproduces_the_merge(base_dir, lora_paths, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from lib_loraclr.hosts.diffusers import DiffusersModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "for_diffusers.safetensors")
    model = load_base(base_dir)
    merge_to_file(model, load_concepts(lora_paths, None), MergeSettings(capture_size=SIZE, capture_steps=4), out)
    written = read_lora(out)

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, local_files_only=True, safety_checker=None)
    targets = DiffusersModel.from_pipeline(pipe).targets()
    base = {t: targets[t].weight.detach().clone() for t in written.modules}
    assert any(t.startswith("text_encoder.") for t in written.modules)
    pipe.load_lora_weights(str(tmp_path), weight_name=os.path.basename(out))
    pipe.fuse_lora()
    for target, module in written.modules.items():
        expected = base[target] + module.delta_weight().reshape(base[target].shape)
        torch.testing.assert_close(targets[target].weight.detach(), expected, atol=1e-5, rtol=1e-4)


def test_sdxl_loras_merge(tiny_sdxl, tmp_path):
    paths = []
    for seed, trigger in enumerate(TRIGGERS[:2], start=1):
        path = str(tmp_path / f"xl{seed}.safetensors")
        write_kohya_lora(path, concept_deltas(tiny_sdxl, seed), "sdxl", rank=4)
        paths.append(path)
    assert any(t.startswith("text_encoder_2.") for t in read_lora(paths[0]).modules)
    out = str(tmp_path / "xl_merged.safetensors")
    summary = merge_to_file(tiny_sdxl, load_concepts(paths, list(TRIGGERS[:2])),
                            MergeSettings(capture_size=SIZE, capture_steps=2), out)
    merged = read_lora(out)
    assert merged.arch == "sdxl"
    assert {t.split(".")[0] for t in merged.modules} == {"unet", "text_encoder", "text_encoder_2"}
    for name in ("xl1", "xl2"):
        assert summary["quality"]["loraclr"][name]["overall"]["crosstalk"] < summary["quality"]["sum"][name]["overall"]["crosstalk"]


def test_sd1_and_sdxl_loras_are_not_mixed(model, lora_paths, tiny_sdxl, tmp_path):
    xl = str(tmp_path / "xl.safetensors")
    write_kohya_lora(xl, concept_deltas(tiny_sdxl, 1), "sdxl", rank=4)
    concepts = load_concepts([lora_paths[0], xl], ["zqx fox", "vbk robot"])
    with pytest.raises(ValueError, match="sdxl"):
        merge_to_file(model, concepts, MergeSettings(capture_size=SIZE), str(tmp_path / "mixed.safetensors"))
    assert not os.path.exists(tmp_path / "mixed.safetensors")


def test_cli_merges_files_from_other_tools(base_dir, model, tmp_path, capsys):
    """PEFT-style diffusers keys, a kohya LoCon with a 3x3 conv, and a LyCORIS LoHa, merged together."""
    targets = model.targets()
    attention = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    cross_v = "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v"
    conv = "unet.down_blocks.0.resnets.1.conv1"
    te_q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    te_out = "text_encoder.text_model.encoder.layers.0.self_attn.out_proj"

    def shape(target):
        return tuple(targets[target].weight.shape)

    def scaled(factors, target, scale=0.05):
        factors = dict(factors)
        key = "lora_up.weight" if "lora_up.weight" in factors else "hada_w1_a"
        factors[key] = factors[key] * scale
        return factors

    peft = write_diffusers_file(tmp_path / "peft.safetensors", {
        t: scaled(lora_factors(shape(t)[0], shape(t)[1], 2, alpha=2, seed=i), t)
        for i, t in enumerate((attention, cross_v, te_q, te_out))
    })
    locon = write_kohya_file(tmp_path / "locon.safetensors", {
        conv: scaled(lora_factors(shape(conv)[0], shape(conv)[1], 2, alpha=1, kernel=(3, 3), seed=7), conv),
        cross_v: scaled(lora_factors(shape(cross_v)[0], shape(cross_v)[1], 2, alpha=1, seed=8), cross_v),
    }, "sd1")
    loha = write_kohya_file(tmp_path / "loha.safetensors", {
        attention: scaled(loha_factors(shape(attention)[0], shape(attention)[1], 2, seed=9), attention),
    }, "sd1")
    out = str(tmp_path / "merged.safetensors")
    report = str(tmp_path / "merged.report.json")
    args = ["merge", "--base", base_dir, "--out", out, "--report", report, "--capture-size", "64", "--capture-steps", "3"]
    for path, trigger in ((peft, "zqx fox"), (locon, "vbk robot"), (loha, "plm vase")):
        args += ["--lora", path, "--trigger", trigger]
    assert main(args) == 0, capsys.readouterr().err
    merged = read_lora(out)
    assert set(merged.modules) == {attention, cross_v, conv, te_q, te_out}
    assert merged.modules[conv].delta_weight().shape == shape(conv)
    with open(report) as handle:
        summary = json.load(handle)
    quality = summary["quality"]["loraclr"]
    assert all(quality[name]["overall"]["retention"] is not None for name in ("peft", "locon", "loha"))
    # the end-to-end figure was taken on the merged deltas as written (3x3 conv included): the file
    # read back gives the same figures
    from lib_loraclr.merge.end_to_end import end_to_end

    concepts = load_concepts([peft, locon, loha], ["zqx fox", "vbk robot", "plm vase"])
    again = end_to_end(model, [c.lora for c in concepts], [1.0] * 3, [f"photo of a {c.trigger}" for c in concepts],
                       merged, ["peft", "locon", "loha"], capture_size=64, capture_steps=3, seed=0)
    for name in ("peft", "locon", "loha"):
        assert again["merged"][name] == pytest.approx(summary["end_to_end"]["merged"][name], abs=1e-5)
        assert again["stacked"][name] == pytest.approx(summary["end_to_end"]["stacked"][name], abs=1e-5)


def _written_deltas(path):
    return {t: m.delta_weight() for t, m in read_lora(path).modules.items()}


def test_memory_budget_splits_capture_into_passes_with_the_same_result(model, lora_paths, tmp_path):
    concepts = load_concepts(lora_paths, None)
    settings = MergeSettings(capture_size=SIZE, capture_steps=3, report=False)
    one = merge_to_file(model, concepts, settings, str(tmp_path / "one.safetensors"))
    messages = []
    progress = Progress(lambda state: messages.append(state.message))
    probe = LoraclrMerge(model, concepts, settings)
    per_concept = activation_bytes(probe.targets_of("unet"), probe._row_counts("unet")[0])
    budget_gb = 2.5 * len(concepts) * per_concept / 2 ** 30  # one batch of every concept, statistics in passes
    tight = MergeSettings(capture_size=SIZE, capture_steps=3, report=False, max_memory_gb=budget_gb)
    several = merge_to_file(model, concepts, tight, str(tmp_path / "several.safetensors"), progress=progress)
    assert one["memory"]["passes"]["unet"] == 1 and several["memory"]["passes"]["unet"] > 2
    assert several["memory"]["batches"]["unet"] == 1, "every concept still in one batch: identical features"
    assert any("capturing in" in m and "passes" in m for m in messages), "the progress says why it samples again"
    assert several["memory"]["peak_statistics_bytes"] < one["memory"]["peak_statistics_bytes"]
    first, second = _written_deltas(str(tmp_path / "one.safetensors")), _written_deltas(str(tmp_path / "several.safetensors"))
    assert first.keys() == second.keys()
    for target in first:
        assert rel_err(second[target], first[target]) < 1e-4, target


def test_unet_concepts_sampled_in_micro_batches_when_one_batch_exceeds_the_budget(model, lora_paths):
    """A budget below one batch's activations: the concepts sample in turn; same optimum, same report."""
    concepts = load_concepts(lora_paths, None)
    settings = MergeSettings(capture_size=SIZE, capture_steps=2)
    probe = LoraclrMerge(model, concepts, settings)
    per_concept = activation_bytes(probe.targets_of("unet"), probe._row_counts("unet")[0])
    budget_gb = 2.5 * per_concept / 2 ** 30  # half of it holds one concept's activations, not two
    tight = MergeSettings(capture_size=SIZE, capture_steps=2, max_memory_gb=budget_gb)
    messages = []
    runs = {}
    for name, chosen, progress in (("one", settings, None),
                                   ("several", tight, Progress(lambda state: messages.append(state.message)))):
        merge = LoraclrMerge(model, concepts, chosen, progress)
        writer = KohyaWriter(model.arch, dtype=torch.float32)
        result = merge.run(writer)
        writer.seal()
        runs[name] = (merge.concept_batches("unet"), result, merge.measure(writer))
    assert runs["one"][0] == [range(3)] and runs["several"][0] == [range(0, 1), range(1, 2), range(2, 3)]
    assert runs["several"][1].batches["unet"] == 3
    assert any("sampling them in 3 batches" in m for m in messages), "the progress says why"
    assert any("concepts 3-3 of 3" in m for m in messages), "the progress says which batch samples"
    one, several = runs["one"][1].layer_info, runs["several"][1].layer_info
    assert one.keys() == several.keys()
    for target, info in one.items():
        assert info["hinge_certified"] == several[target]["hinge_certified"], target
        loss, batched_loss = info["surrogate_loss"], several[target]["surrogate_loss"]
        # a batch of 1 rounds the features differently from a batch of 3 (~2e-6 relative)
        assert abs(batched_loss - loss) <= 1e-4 * abs(loss), target
    for method, figures in runs["one"][2].items():
        for concept, groups in figures.items():
            for group, values in groups.items():
                for key, value in values.items():
                    batched = runs["several"][2][method][concept][group][key]
                    assert abs(batched - value) < 1e-3, (method, concept, group, key)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_report_matches_figures_computed_from_raw_features(model, lora_paths, tmp_path):
    """The streamed report against retention/crosstalk/error computed directly on the captured rows."""
    concepts = load_concepts(lora_paths[:2], None)
    settings = MergeSettings(capture_size=SIZE, capture_steps=2)
    out = str(tmp_path / "reported.safetensors")
    summary = merge_to_file(model, concepts, settings, out)
    written = read_lora(out)
    merge = LoraclrMerge(model, concepts, settings)
    targets = merge.targets_of("text_encoder")
    raw = StatsCollector(targets, {t: merge.factors(t) for t in targets}, 2, mode="raw")
    merge.capture("text_encoder", raw, "raw rows")
    for i, concept in enumerate(concepts):
        own = overlap = merged_sq = orthogonal = 0.0
        for target in targets:
            x = raw.raw(target)[i].double()
            mine = concept.lora.modules.get(target)
            effect = x @ (mine.delta_weight().double().flatten(1) * concept.weight).T if mine else torch.zeros(1)
            merged = x @ written.modules[target].delta_weight().double().flatten(1).T
            own_sq = float(effect.square().sum()) if mine else 0.0
            lap = float((merged * effect).sum()) if mine else 0.0
            m_sq = float(merged.square().sum())
            own, overlap, merged_sq = own + own_sq, overlap + lap, merged_sq + m_sq
            orthogonal += max(m_sq - (lap * lap / own_sq if own_sq > 0 else 0.0), 0.0)
        figures = summary["quality"]["loraclr"][concept.lora.name]["text_encoder"]
        assert figures["retention"] == pytest.approx(overlap / own, rel=1e-4)
        assert figures["crosstalk"] == pytest.approx((orthogonal / own) ** 0.5, rel=1e-4)
        assert figures["error"] == pytest.approx(((merged_sq - 2 * overlap + own) / own) ** 0.5, rel=1e-4)


def test_sum_without_report_and_end_to_end_runs_no_model(model, lora_paths, tmp_path, monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("sum without a report must not run the model")

    monkeypatch.setattr(LoraclrMerge, "capture", no_capture)
    monkeypatch.setattr(model, "unet_eps", no_capture)
    concepts = load_concepts(lora_paths[:2], None)
    for method in ("sum", "svd"):
        summary = merge_to_file(model, concepts, MergeSettings(method=method, report=False, end_to_end=False),
                                str(tmp_path / f"{method}.safetensors"))
        assert summary["quality"] == {} and summary["end_to_end"] is None and summary["table"] == ""


def test_cli_no_report_and_memory_options(base_dir, lora_paths, tmp_path, capsys):
    out = str(tmp_path / "cli.safetensors")
    args = ["merge", "--base", base_dir, "--lora", lora_paths[0], "--lora", lora_paths[1], "--out", out,
            "--capture-size", str(SIZE), "--capture-steps", "2"]
    assert main(args + ["--no-report", "--report", str(tmp_path / "r.json")]) == 2
    assert "--no-report" in capsys.readouterr().err and not os.path.exists(out)
    assert main(args + ["--max-memory", "-1"]) == 2
    assert capsys.readouterr().err == "error: --max-memory: ensure this value is greater than 0\n"
    assert not os.path.exists(out)
    assert main(args + ["--no-report", "--max-memory", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "retention" not in printed and "wrote" in printed
    metadata = safe_open(out, "pt").metadata()
    assert "loraclr_quality" not in metadata and json.loads(metadata["loraclr_settings"])["max_memory_gb"] == 0.5


def test_non_finite_model_features_are_refused_by_layer_name(base_dir, lora_paths, tmp_path):
    """A base model whose activations turn NaN: one clear error naming a layer, no file, no linear-algebra traceback."""
    broken = load_base(base_dir)
    layer = dict(broken.targets())["unet.down_blocks.0.attentions.0.proj_in"]
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    concepts = load_concepts(lora_paths[:2], None)
    out = tmp_path / "never.safetensors"
    with pytest.raises(MergeInputError, match=r"^unet\..*: the captured layer features are not finite"):
        merge_to_file(broken, concepts, MergeSettings(capture_size=SIZE, capture_steps=1, report=False), str(out))
    assert not out.exists()


def test_trigger_rows_read_a1111_syntax_like_the_webuis_and_find_the_trigger_tokens(model):
    """The merge finds trigger tokens with the composition's token finder: A1111 syntax in a
    trigger is read as text (``miku (vocaloid)`` -> ``miku vocaloid``), positions count BOS as 0,
    the EOS row follows the last prompt token. The answer is the tokenizer's own ids."""
    from types import SimpleNamespace

    from lib_loraclr.merge.engine import MergeInputError, plain_trigger, trigger_rows

    words = plain_trigger(SimpleNamespace(trigger="miku (vocaloid)"))
    assert words == "miku vocaloid"
    prompt = MergeSettings().prompt_template.format(words)
    ids = model.tokenizer(prompt, add_special_tokens=False).input_ids
    trigger_ids = model.tokenizer(words, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(trigger_ids)] == trigger_ids)
    expected = [1 + start + k for k in range(len(trigger_ids))] + [len(ids) + 1]
    assert trigger_rows(model, [prompt, words], [words, words]) == [expected, list(range(1, 1 + len(trigger_ids))) + [len(trigger_ids) + 1]]
    assert model.tokenize([prompt])[0, expected[-1]] == model.tokenizer.eos_token_id
    with pytest.raises(MergeInputError, match="not found"):
        trigger_rows(model, ["photo of a mikuvocaloid"], ["miku"])


def test_end_to_end_figure_is_one_for_the_concepts_own_lora_zero_for_none_and_the_formula_between(model, lora_paths):
    """Known answers: a "merged" file that is concept 1's own LoRA keeps 1 for concept 1; an empty
    one keeps 0 for everyone; concept 2's figure for concept 1's LoRA is the formula computed here
    with separate runs (own, base, other) at the held-out latents, timesteps and size."""
    from lib_loraclr.merge.end_to_end import SAMPLES, SEED_OFFSET, end_to_end, held_out_size, held_out_timesteps
    from lib_loraclr.sampling import initial_noise, trailing_timesteps

    assert held_out_size(64) == (64, 128) and held_out_size(512) == (512, 384) and held_out_size(1024) == (1024, 768)
    for steps in (1, 2, 4, 8, 20, 50, 200):
        assert not set(held_out_timesteps(1000, steps)) & set(trailing_timesteps(1000, steps).tolist())
    concepts = load_concepts(lora_paths[:2], None)
    loras, prompts, names = [c.lora for c in concepts], ["photo of a zqx fox", "photo of a vbk robot"], ["a", "b"]
    kwargs = dict(capture_size=SIZE, capture_steps=2, seed=5)
    own = end_to_end(model, loras, [1.0, 1.0], prompts, loras[0], names, **kwargs)
    assert own["merged"]["a"] == pytest.approx(1.0, abs=1e-4)
    empty = LoraFile("none", "merged", None, {})
    none = end_to_end(model, loras, [1.0, 1.0], prompts, empty, names, **kwargs)
    assert none["merged"] == {"a": pytest.approx(0.0, abs=1e-6), "b": pytest.approx(0.0, abs=1e-6)}
    assert none["stacked"] == own["stacked"]

    (height, width), timesteps = own["size"], own["timesteps"]
    latents = initial_noise((SAMPLES * len(timesteps), 4, height // 8, width // 8), 5 + SEED_OFFSET)
    with torch.no_grad():
        def eps(active):
            with LoraRuntime(model.targets(), [loras[i] for i in active]):
                cond = model.encode([prompts[1]])
                return torch.cat([model.unet_eps(latent[None], torch.tensor([t]), cond)
                                  for latent, t in zip(latents, timesteps * SAMPLES)]).float()
        concept_b, base, concept_a = eps([1]), eps([]), eps([0])
    expected = 1 - ((concept_a - concept_b).square().sum() / (base - concept_b).square().sum()).sqrt().item()
    assert own["merged"]["b"] == pytest.approx(expected, abs=1e-4)


def test_progress_only_moves_forward_when_a_stage_runs_again():
    """The UNet stage plans (0.6) before its sampling (0.2-0.6) and a second capture pass samples
    again: the bar holds instead of jumping back; the stage text still says what runs."""
    seen = []
    progress = Progress(lambda state: seen.append((state.stage, state.fraction)))
    progress.update("unet", 0, 10, message="planning the unet capture")
    progress.update("sampling", 1, 4)
    progress.update("unet", 5, 10)
    progress.update("sampling", 1, 4)
    progress.update("write", 2, 2)
    fractions = [fraction for _, fraction in seen]
    assert fractions == sorted(fractions) and fractions[0] == pytest.approx(0.6) and fractions[-1] == 1.0
    assert [stage for stage, _ in seen] == ["unet", "sampling", "unet", "sampling", "write"]


def test_the_end_to_end_figure_has_its_own_switch(model, lora_paths, tmp_path):
    """Without the per-layer report the figure is still measured and printed; --no-end-to-end skips it."""
    concepts = load_concepts(lora_paths[:2], None)
    quick = dict(capture_size=SIZE, capture_steps=1, report=False)
    alone = merge_to_file(model, concepts, MergeSettings(**quick), str(tmp_path / "a.safetensors"))
    assert alone["quality"] == {} and set(alone["end_to_end"]["merged"]) == {"concept1", "concept2"}
    assert alone["table"].startswith("end to end: ") and "end_to_end" in alone["seconds"]
    none = merge_to_file(model, concepts, MergeSettings(**quick, end_to_end=False), str(tmp_path / "b.safetensors"))
    assert none["end_to_end"] is None and none["table"] == "" and "end_to_end" not in none["seconds"]
