"""CLoRA math: settings scaling, token positions from the real CLIP tokenizer, the
contrastive loss against an explicit-loop version, masks and fusion."""

import math
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from lib_loraclr.compose.concepts import LoraConcept, plan_concepts
from lib_loraclr.prompt import parse_attention, parse_prompt
from lib_loraclr.compose.fusion import (
    cfg_combine,
    concept_masks,
    fuse,
    pass_lora_sets,
    uniform_masks,
)
from lib_loraclr.compose.loss import contrastive_attention_loss, gather_token_maps
from lib_loraclr.compose.settings import ComposeSettings
from lib_loraclr.validation import from_mapping

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "lib_loraclr" / "assets" / "clip_tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def encoder_positions(tokenizer, text, word):
    """Positions of `word`'s tokens in `text` as the encoder gets it, found by id search."""
    ids = tokenizer(text)["input_ids"]
    word_ids = tokenizer.encode(word, add_special_tokens=False)
    for start in range(len(ids)):
        if ids[start : start + len(word_ids)] == word_ids:
            return tuple(range(start, start + len(word_ids)))
    raise AssertionError(f"{word!r} not in {text!r}")


# ---------------------------------------------------------------- settings


def test_schedule_scales_with_step_count():
    settings = ComposeSettings()
    assert settings.alter_until(50) == 30
    assert settings.refinement_steps_for(50) == (0, 10, 20)
    assert settings.alter_until(20) == 12
    assert settings.refinement_steps_for(20) == (0, 4, 8)
    assert settings.alter_until(100) == 60
    assert settings.refinement_steps_for(3) == (0, 1)  # 0.6 -> 1, 1.2 -> 1: deduplicated
    assert settings.attention_map_hw(512, 512) == (16, 16)
    assert settings.attention_map_hw(520, 768) == (17, 24)


def test_settings_reject_bad_values_and_unknown_keys():
    with pytest.raises(ValueError, match="temperature"):
        ComposeSettings(temperature=0)
    with pytest.raises(ValueError, match="mask_threshold"):
        ComposeSettings(mask_threshold=1.5)
    with pytest.raises(ValueError, match="stepsize: unknown setting"):
        from_mapping(ComposeSettings, {"stepsize": 1.0})
    assert from_mapping(ComposeSettings, {"step_size": 5.0}).step_size == 5.0


# ---------------------------------------------------------------- concepts


def test_attention_syntax_weights_like_a1111():
    fragments = parse_attention(r"a (black cat:1.2), ((dog)) [tree] \(x\) <lora:my_lora:0.8>end")
    as_pairs = [(f.text, round(f.weight, 4)) for f in fragments]
    assert as_pairs == [
        ("a ", 1.0),
        ("black cat", 1.2),
        (", ", 1.0),
        ("dog", 1.21),
        (" ", 1.0),
        ("tree", round(1 / 1.1, 4)),
        (" (x) end", 1.0),
    ]


def test_clean_prompt_and_char_map(tokenizer):
    prompt = "A (Black Cat:1.2) and a ((dog)) <lora:dogs:1>, photo"
    parsed = parse_prompt(prompt, tokenizer)
    assert parsed.clean == "A Black Cat and a dog , photo"
    assert list(parsed.token_ids) == tokenizer.encode(parsed.clean, add_special_tokens=False)
    # every char maps to the token the encoder sees at that position
    ids = tokenizer(parsed.clean)["input_ids"]
    for char, position in zip(parsed.clean, parsed.char_to_token):
        if char == " ":
            assert position == -1
        else:
            assert char.lower() in tokenizer.convert_ids_to_tokens(ids[position])
    # raw offsets point back into the written prompt
    assert all(prompt[o] == c for c, o in zip(parsed.clean, parsed.raw_offsets))


def test_positions_match_tokenizer_for_multi_token_words(tokenizer):
    word = "zorblaxian"
    assert len(tokenizer.encode(word, add_special_tokens=False)) >= 2
    prompt = f"a {word} pet next to a cat"
    parsed = parse_prompt(prompt, tokenizer)
    assert parsed.positions_of(word) == [encoder_positions(tokenizer, prompt, word)]
    assert parsed.positions_of("cat") == [encoder_positions(tokenizer, prompt, "cat")]
    assert parsed.positions_of(word)[0][0] == 2  # BOS at 0, "a" at 1


def test_positions_case_punctuation_and_whole_words(tokenizer):
    parsed = parse_prompt("A CAT, a cat's toy and cats.", tokenizer)
    # "cats" is another word; "CAT," and "cat's" are both the word cat
    assert parsed.positions_of("cat") == [(2,), (5,)]
    parsed = parse_prompt("a black   cat", tokenizer)
    assert parsed.positions_of("Black Cat") == [(2, 3)]


def test_plan_from_a1111_prompt(tokenizer):
    base = "a (cat:1.2) and a dog <lora:x:1>"
    plan = plan_concepts(base, [LoraConcept("cat", trigger="sks"), LoraConcept("dog")], tokenizer)
    assert [p.prompt for p in plan.passes] == [base, "a (sks cat:1.2) and a dog <lora:x:1>", base]
    assert [p.clean_prompt for p in plan.passes] == ["a cat and a dog ", "a sks cat and a dog ", "a cat and a dog "]
    assert [p.lora_index for p in plan.passes] == [None, 0, 1]
    # "a cat and a dog": a=1 cat=2 and=3 a=4 dog=5; pass 1 has sks at 2, cat at 3, dog at 6
    assert plan.groups == (((0, 2), (1, 2), (1, 3), (2, 2)), ((0, 5), (1, 6), (2, 5)))
    assert [p.mask_positions for p in plan.passes] == [(), (2, 3), (5,)]
    assert plan.group_names == ("cat", "dog")
    clean_ids = tokenizer(plan.passes[1].clean_prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(clean_ids[2:4]) == ["sks</w>", "cat</w>"]


def test_plan_multi_token_words_explicit_prompts_and_repeats(tokenizer):
    concepts = [
        LoraConcept("black cat", trigger="zorblaxian", prompt="a zorblaxian black cat near a dog, the black cat sits"),
        LoraConcept("dog"),
    ]
    plan = plan_concepts("a black cat near a dog, the black cat sits", concepts, tokenizer)
    lora_prompt = concepts[0].prompt
    trigger = encoder_positions(tokenizer, lora_prompt, "zorblaxian")
    assert len(trigger) >= 2
    ids = tokenizer(lora_prompt)["input_ids"]
    black_cat = tokenizer.encode("black cat", add_special_tokens=False)
    starts = [i for i in range(len(ids)) if ids[i : i + 2] == black_cat]
    assert len(starts) == 2
    words = tuple(p for start in starts for p in (start, start + 1))
    assert plan.passes[1].mask_positions == tuple(sorted(trigger + words))
    # base pass: both occurrences (repeated words: all occurrences count)
    assert [t for p, t in plan.groups[0] if p == 0] == [2, 3, 9, 10]


def test_missing_word_and_overlap_errors(tokenizer):
    with pytest.raises(ValueError, match=r"'horse'.*'a cat and a dog'"):
        plan_concepts("a cat and a dog", [LoraConcept("horse", trigger="sks")], tokenizer)
    with pytest.raises(ValueError, match=r"'dog'.*'a sks cat only'"):
        plan_concepts(
            "a cat and a dog", [LoraConcept("cat", prompt="a sks cat only"), LoraConcept("dog")], tokenizer
        )
    with pytest.raises(ValueError, match="trigger 'sks'"):
        plan_concepts("a cat and a dog", [LoraConcept("cat", trigger="sks", prompt="a cat and a dog")], tokenizer)
    with pytest.raises(ValueError, match="belongs to both"):
        plan_concepts("a black cat", [LoraConcept("black cat"), LoraConcept("cat")], tokenizer)
    with pytest.raises(ValueError, match="BREAK"):
        plan_concepts("a cat BREAK a dog", [LoraConcept("cat")], tokenizer)
    with pytest.raises(ValueError, match="77-token"):
        plan_concepts("a cat " + "very " * 80, [LoraConcept("cat")], tokenizer)


# ---------------------------------------------------------------- loss


def slow_loss(maps, labels, temperature):
    """The loss written out pair by pair in float64 Python."""
    vectors = []
    for row in maps.tolist():
        low, high = min(row), max(row)
        vectors.append([(v - low) / max(high - low, 1e-12) for v in row])

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    total, count = 0.0, 0
    for a in range(len(vectors)):
        for p in range(len(vectors)):
            if a == p or labels[a] != labels[p]:
                continue
            positive = math.exp(cos(vectors[a], vectors[p]) / temperature)
            negatives = sum(
                math.exp(cos(vectors[a], vectors[n]) / temperature)
                for n in range(len(vectors))
                if labels[n] != labels[a]
            )
            total += -math.log(positive / (positive + negatives))
            count += 1
    return total / count


def blob(center, size=8, sigma=1.5):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.exp(-((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / (2 * sigma**2)).flatten()


def test_loss_equals_explicit_loops():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(9, 64, generator=generator, dtype=torch.float64) ** 3
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for temperature in (0.5, 0.1):
        expected = slow_loss(maps, labels, temperature)
        got = contrastive_attention_loss(maps, labels, temperature)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_batched_and_single_group():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 5, 16, generator=generator)
    labels = torch.tensor([0, 1, 0, 1, 1])
    batched = contrastive_attention_loss(maps, labels, 0.5)
    assert batched.shape == (3,)
    for b in range(3):
        assert batched[b].item() == pytest.approx(slow_loss(maps[b], labels.tolist(), 0.5), rel=1e-5)
    single = maps[0].clone().requires_grad_(True)
    loss = contrastive_attention_loss(single, [0] * 5, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(single.grad).all()
    with pytest.raises(ValueError, match="positive pair"):
        contrastive_attention_loss(maps[0, :2], [0, 1], 0.5)


def test_loss_gradient_flows_and_separation_lowers_loss():
    labels = [0, 0, 1, 1]
    overlapping = torch.stack([blob((3, 3)), blob((3, 4)), blob((4, 3)), blob((4, 4))])
    separated = torch.stack([blob((1, 1)), blob((1, 2)), blob((6, 6)), blob((6, 5))])
    overlapping_loss = contrastive_attention_loss(overlapping, labels)
    separated_loss = contrastive_attention_loss(separated, labels)
    assert separated_loss < overlapping_loss - 0.1

    maps = overlapping.clone().requires_grad_(True)
    loss = contrastive_attention_loss(maps, labels)
    loss.backward()
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0
    # one descent step on the maps lowers the loss
    stepped = contrastive_attention_loss(overlapping - 0.05 * maps.grad / maps.grad.abs().max(), labels)
    assert stepped < loss


def test_gather_token_maps_follows_plan(tokenizer):
    plan = plan_concepts("a cat and a dog", [LoraConcept("cat", trigger="sks"), LoraConcept("dog")], tokenizer)
    probs = torch.rand(3, 2, 16, 77)  # (P, B, HW, T)
    maps, labels = gather_token_maps(probs, plan)
    assert maps.shape == (2, 7, 16)
    expected_entries = [(p, t) for group in plan.groups for p, t in group]
    assert labels.tolist() == [g for g, group in enumerate(plan.groups) for _ in group]
    for m, (p, t) in enumerate(expected_entries):
        assert torch.equal(maps[:, m], probs[p, :, :, t])
    single, _ = gather_token_maps(probs[:, 0], plan)
    assert torch.equal(single, maps[0])


# ---------------------------------------------------------------- masks and fusion


@pytest.fixture(scope="module")
def two_lora_plan(tokenizer):
    # passes: base, cat LoRA (mask tokens sks=2, cat=3), dog LoRA (mask token dog=5)
    return plan_concepts("a cat and a dog", [LoraConcept("cat", trigger="sks"), LoraConcept("dog")], tokenizer)


def attention_with_regions(plan, regions, size=4):
    """(P, HW, 77) probabilities where each pass's mask tokens attend to one square region."""
    probs = torch.full((len(plan.passes), size * size, 77), 0.01)
    for p, (rows, cols) in regions.items():
        region = torch.zeros(size, size)
        region[rows, cols] = 1.0
        for t in plan.passes[p].mask_positions:
            probs[p, :, t] = 0.01 + region.flatten()
    return probs


def test_masks_partition_base_fill_and_overlap_average(two_lora_plan):
    # cat owns rows 0-1, dog owns columns 2-3: they overlap on rows 0-1 x cols 2-3
    probs = attention_with_regions(two_lora_plan, {1: (slice(0, 2), slice(None)), 2: (slice(None), slice(2, 4))})
    masks = concept_masks(probs, two_lora_plan, threshold=0.3, latent_hw=(8, 8))
    assert masks.shape == (3, 1, 8, 8)
    assert torch.allclose(masks.sum(dim=0), torch.ones(1, 8, 8))
    base, cat, dog = masks[:, 0]
    # nearest upsampling x2: map cell (r, c) covers latent rows 2r..2r+1, cols 2c..2c+1
    assert torch.all(base[4:, :4] == 1) and torch.all(cat[4:, :4] == 0) and torch.all(dog[4:, :4] == 0)
    assert torch.all(base[:4] == 0) and torch.all(base[:, 4:] == 0)
    assert torch.all(cat[:4, :4] == 1)
    assert torch.all(dog[4:, 4:] == 1)
    assert torch.all(cat[:4, 4:] == 0.5) and torch.all(dog[:4, 4:] == 0.5)


def test_masks_threshold_union_and_batch(two_lora_plan):
    probs = torch.full((3, 2, 16, 77), 0.01)  # (P, B, HW, T)
    sks, cat = two_lora_plan.passes[1].mask_positions
    (dog,) = two_lora_plan.passes[2].mask_positions
    probs[1, 0, 0, sks] = 1.0  # image 0: sks attends to cell 0 ...
    probs[1, 0, 5, cat] = 1.0  # ... and cat to cell 5: the union owns both
    probs[1, 0, 6, cat] = 0.2  # below 0.3 * max: not in the mask
    probs[2, 0, 15, dog] = 1.0
    probs[1, 1, 3, [sks, cat]] = 1.0  # image 1 gets its own mask (a flat map would own all)
    probs[2, 1, 12, dog] = 1.0
    masks = concept_masks(probs, two_lora_plan, threshold=0.3, latent_hw=(4, 4))
    assert masks.shape == (3, 2, 1, 4, 4)
    cat_cells = masks[1, :, 0].flatten(1).nonzero().tolist()
    assert cat_cells == [[0, 0], [0, 5], [1, 3]]
    assert masks[2, 0, 0].flatten().nonzero().flatten().tolist() == [15]
    assert masks[2, 1, 0].flatten().nonzero().flatten().tolist() == [12]
    assert torch.allclose(masks.sum(dim=0), torch.ones(2, 1, 4, 4))


def test_masks_infer_non_square_map_shape(two_lora_plan):
    probs = torch.full((3, 2 * 3, 77), 0.01)  # 2x3 attention map for a 4x6 latent
    probs[1, 5, [2, 3]] = 1.0  # sks and cat tokens: bottom-right map cell
    probs[2, 0, 5] = 1.0  # dog token: top-left map cell
    masks = concept_masks(probs, two_lora_plan, threshold=0.5, latent_hw=(4, 6))
    assert torch.all(masks[1, 0, 2:, 4:] == 1) and masks[1].sum() == 4
    assert torch.all(masks[2, 0, :2, :2] == 1) and masks[2].sum() == 4


def test_fuse_is_per_pixel_combination_and_cfg_after_fusion(two_lora_plan):
    generator = torch.Generator().manual_seed(2)
    probs = torch.rand(3, 2, 16, 77, generator=generator)
    masks = concept_masks(probs, two_lora_plan, threshold=0.3, latent_hw=(8, 8))  # (P, B, 1, H, W)
    uncond = torch.randn(3, 2, 4, 8, 8, generator=generator)
    cond = torch.randn(3, 2, 4, 8, 8, generator=generator)
    fused_uncond, fused_cond = fuse(uncond, masks), fuse(cond, masks)
    expected = sum(masks[p, 1, 0, 5, 6] * cond[p, 1, :, 5, 6] for p in range(3))
    assert torch.allclose(fused_cond[1, :, 5, 6], expected)
    guided = cfg_combine(fused_uncond, fused_cond, 7.5)
    assert torch.allclose(guided, fused_uncond + 7.5 * (fused_cond - fused_uncond))
    # CFG is linear and the weights sum to 1: guiding each pass first gives the same image
    assert torch.allclose(guided, fuse(cfg_combine(uncond, cond, 7.5), masks), atol=1e-5)


def test_uniform_masks_give_plain_average():
    preds = torch.randn(3, 2, 4, 8, 8)
    fused = fuse(preds, uniform_masks(3, (8, 8)))
    assert torch.allclose(fused, preds.mean(dim=0), atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        fuse(preds, uniform_masks(2, (8, 8)))


def test_style_lora_pass_sets(two_lora_plan):
    assert pass_lora_sets(two_lora_plan) == [frozenset(), {0}, {1}]
    sets = pass_lora_sets(two_lora_plan, {5: None, 6: [1]})
    assert sets == [{5}, {0, 5}, {1, 5, 6}]
    with pytest.raises(ValueError, match="also a subject"):
        pass_lora_sets(two_lora_plan, {0: None})
    with pytest.raises(ValueError, match="unknown concept"):
        pass_lora_sets(two_lora_plan, {5: [7]})
