"""The toy-world benchmark: scene generator, judge (on rendered scenes with known answers),
the committed model and LoRAs, and a reduced benchmark run (so it cannot rot)."""

import json
import os

import numpy as np
import pytest
import torch

from bench.toyworld import judge, world
from bench.toyworld.run import METHODS, main, parse_prompt, run
from bench.toyworld.train_base import DEFAULT_OUT as BASE_DIR
from bench.toyworld.train_loras import LORA_DIR


def test_scenes_are_deterministic_and_captioned():
    a, b = world.base_example(7), world.base_example(7)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], world.base_example(8)[0])
    image, text, scene = world.concept_example(0, 3)
    assert text == "a zorb" and scene.objects[0].attributes() == world.CONCEPTS[0].attributes()
    scene = world.Scene([world.Obj("circle", "red", "striped", x=2, y=2), world.Obj("square", "blue", x=18, y=16)])
    assert world.caption(scene) == "a red striped circle and a blue square"
    assert image.shape == (world.SIZE, world.SIZE, 3) and image.dtype == np.uint8


def test_judge_reads_rendered_scenes():
    for seed in range(60):
        image, _, scene = world.base_example(seed)
        background, found = judge.find_objects(image)
        assert background == "black"
        assert sorted(tuple(f.attributes().values()) for f in found) == sorted(
            tuple(o.attributes().values()) for o in scene.objects), seed
    for style in world.STYLES:
        for seed in range(10):
            image, _, scene = world.style_example(style, seed)
            result = judge.score(image, [o.attributes() for o in scene.objects], background=style.background,
                                 hollow=style.hollow)
            assert result["alignment"] == 1.0 and result["count_ok"] == 1.0, (style, seed)


def _concept(index):
    return {**world.CONCEPTS[index].attributes(), "concept": True}


def test_judge_scores_known_answers():
    zorb, quib = world.CONCEPTS[0], world.CONCEPTS[1]  # red striped triangle, blue solid circle
    right = world.Scene([zorb.as_object(x=2, y=4, size=11), quib.as_object(x=18, y=14, size=11)])
    result = judge.score(world.render(right), [_concept(0), _concept(1)])
    assert (result["recall"], result["fidelity"], result["exact"], result["bleeding"], result["alignment"]) == (
        1.0, 1.0, 1.0, 0.0, 1.0)

    # zorb drawn in quib's colour: one wrong attribute, and it is another concept's -> bleeding
    bled = world.Scene([world.Obj("triangle", "blue", "striped", x=2, y=4, size=11), quib.as_object(x=18, y=14)])
    result = judge.score(world.render(bled), [_concept(0), _concept(1)])
    assert result["recall"] == 1.0 and result["fidelity"] == pytest.approx(5 / 6)
    assert result["bleeding"] == pytest.approx(1 / 6) and result["exact"] == 0.5
    assert result["bleeding_drawn"] == pytest.approx(1 / 6)  # both drawn: the same as bleeding

    # a wrong colour nobody asked for is an error but not bleeding
    wrong = world.Scene([world.Obj("triangle", "green", "striped", x=2, y=4, size=11), quib.as_object(x=18, y=14)])
    assert judge.score(world.render(wrong), [_concept(0), _concept(1)])["bleeding"] == 0.0
    # ... unless a loaded concept that the prompt does not name has it
    loaded = judge.score(world.render(wrong), [_concept(0), _concept(1)], other_concepts=[world.CONCEPTS[2].attributes()])
    assert loaded["bleeding"] == pytest.approx(1 / 6)

    # quib missing: recall 1/2; the plain object of the prompt missing: alignment drops
    only_zorb = world.Scene([zorb.as_object(x=2, y=4)])
    assert judge.score(world.render(only_zorb), [_concept(0), _concept(1)])["recall"] == 0.5
    # zorb in quib's colour and quib missing: bleeding over both concepts, per drawn object over zorb only
    bled_alone = judge.score(world.render(world.Scene([world.Obj("triangle", "blue", "striped", x=2, y=4, size=11)])),
                             [_concept(0), _concept(1)])
    assert bled_alone["bleeding"] == pytest.approx(1 / 6) and bled_alone["bleeding_drawn"] == pytest.approx(1 / 3)
    assert judge.score(world.render(world.Scene([])), [_concept(0), _concept(1)])["bleeding_drawn"] is None
    plain = {"shape": "square", "colour": "yellow", "pattern": "solid"}
    assert judge.score(world.render(only_zorb), [_concept(0), plain])["alignment"] == 0.5
    assert judge.score(world.render(world.Scene([])), [_concept(0)])["recall"] == 0.0


def test_free_text_prompts_are_read_into_concepts_and_wanted_objects():
    job = parse_prompt("a zorb and a blue striped square and a quib")
    assert job["concepts"] == [0, 1]
    assert job["wanted"] == [_concept(0), {"shape": "square", "colour": "blue", "pattern": "striped"}, _concept(1)]
    assert parse_prompt("a quib and a zorb and a quib")["concepts"] == [1, 0]
    with pytest.raises(ValueError, match="fewer than two different concepts"):
        parse_prompt("a zorb and a red circle")
    with pytest.raises(ValueError, match="cannot read 'a dog'"):
        parse_prompt("a zorb and a dog")


assets = pytest.mark.skipif(not os.path.isfile(os.path.join(BASE_DIR, "model_index.json")),
                            reason="toy-world model not built (python -m bench.toyworld.train_base)")


@assets
def test_committed_model_and_loras_load():
    from lib_loraclr.hosts.diffusers import load_base
    from lib_loraclr.lora.reader import read_lora

    model = load_base(BASE_DIR)
    assert model.arch == "sd1" and model.vae_scale_factor == 4
    for concept in world.CONCEPTS:
        lora = read_lora(os.path.join(LORA_DIR, f"{concept.trigger}.safetensors"))
        assert lora.triggers[0] == concept.trigger
        assert any(t.startswith("text_encoder.") for t in lora.modules)
        assert any(t.endswith("attn2.to_k") for t in lora.modules)
        assert set(lora.modules) <= set(model.targets())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.dirname(BASE_DIR)) for f in fs)
    assert total < 30 * 2**20


@assets
def test_reduced_benchmark_run(tmp_path):
    prompts = [parse_prompt("a quib and a zorb"), parse_prompt("a zorb and a dax")]
    results = run(counts=(2,), seeds=1, first_seed=5, prompts=prompts, methods=("stack", "loraclr", "distill", "clora", "masked"),
                  steps=4, out=str(tmp_path), log=lambda m: None, clora_refine_iters=1, capture_steps=4,
                  merge_settings={"distill_iters": 3, "distill_trajectories": 1}, compose_settings={"warmup_steps": 2, "guidance_scale": 3.0})
    entry = results["by_count"]["2"]
    for method in ("single", "stack", "loraclr", "distill"):
        assert 0.0 <= entry[method]["single_prompts"]["fidelity"] <= 1.0
    assert results["settings"]["merge_settings"] == {"distill_iters": 3, "distill_trajectories": 1}
    assert results["settings"]["compose_settings"] == {"warmup_steps": 2, "guidance_scale": 3.0}
    assert "Bleeding per drawn object" in results["table"]
    assert set(entry["stack"]["single_prompts_by_concept"]) == {"zorb", "quib"}
    assert entry["stack"]["single_prompts_by_concept"]["zorb"]["images"] == 2  # "a zorb", "a zorb and a <plain>"
    assert set(entry["masked"]["pair_prompts_by_prompt"]) == {"a quib and a zorb"}
    for method in ("clora", "masked"):
        assert entry[method]["pair_prompts"]["images"] == 1  # "a zorb and a dax" needs 3 concepts loaded
        assert 0.0 <= entry[method]["mask_iou"] <= 1.0 and len(entry[method]["mask_iou_by_step"]) == 4
    # UNet batch rows per image against plain sampling's 2 per step: CLoRA's 3 passes, the single pass
    assert entry["masked"]["cost"]["unet_rows_per_image"] == 1.0
    assert entry["clora"]["cost"]["unet_rows_per_image"] >= 3.0
    assert "mask IoU" in results["table"]
    assert results["settings"]["seeds"] == [5]
    assert "single LoRA -> method" in results["table"]
    for name in ("results.json", "table.txt", "plot.png", "grid.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["counts"] == [2]
    assert set(METHODS) == {"stack", "svd", "lsq", "loraclr", "distill", "clora", "masked"}


@pytest.mark.parametrize("option", ["--compose-setting", "--merge-setting"])
def test_benchmark_refuses_bad_settings_before_any_work(option, capsys):
    with pytest.raises(SystemExit):
        main([option, "warmup_steps=-1" if option == "--compose-setting" else "distill_iters=-1"])
    assert option in capsys.readouterr().err


def test_mask_iou_compares_each_subject_mask_with_its_object():
    from bench.toyworld.run import mask_iou

    masks = torch.zeros(3, 1, 1, 8, 8)  # base, subject 0, subject 1 at the latent's 8x8 (4x4 pixels each)
    masks[1, 0, 0, 0, 0] = 1.0  # subject 0 owns pixels [0:4, 0:4]
    masks[2, 0, 0, 7, 7] = 1.0
    masks[0] = 1 - masks[1:].sum(0)
    obj = np.zeros((32, 32), bool)
    obj[0:4, 2:6] = True  # half inside subject 0's cell: IoU = 8 / (16 + 16 - 8)
    assert mask_iou(masks, [obj, None]) == [pytest.approx(8 / 24), 0.0]


def test_style_prompts_end_with_the_style_words_and_tell_the_judge():
    from bench.toyworld.run import pair_prompts, style_file, with_style

    outline = next(s for s in world.STYLES if s.hollow)
    (styled,) = with_style(pair_prompts(2), outline)
    assert styled["prompt"] == "a zorb and a quib, outline style"
    assert styled["judge"] == {"background": "black", "hollow": True}
    assert with_style(pair_prompts(2), None) == pair_prompts(2)
    assert os.path.isfile(os.path.join(LORA_DIR, style_file(outline)))
