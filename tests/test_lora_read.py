"""Reading every LoRA family into canonical targets, with deltas checked against formulas."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lib_loraclr.lora import (
    ArchMismatchError,
    LoraFormatError,
    check_same_arch,
    describe,
    read_lora,
)
from lora_fixtures import (
    SD1_CROSS_ATTN_K,
    SD1_RESNET_CONV,
    SD1_SELF_ATTN_Q,
    SD1_TE_Q,
    lokr_factors,
    loha_factors,
    lora_factors,
    write_diffusers_file,
    write_file,
    write_kohya_file,
    write_peft_folder,
    write_processor_file,
)


def lora_formula(f: dict) -> torch.Tensor:
    """scale * up @ down, with alpha missing meaning scale 1."""
    up, down = f["lora_up.weight"], f["lora_down.weight"]
    rank = down.shape[0]
    scale = float(f["alpha"]) / rank if "alpha" in f else 1.0
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --- kohya ------------------------------------------------------------------------------


def test_kohya_sd1_diffusers_style(tmp_path):
    modules = {
        SD1_CROSS_ATTN_K: lora_factors(8, 768, 2, alpha=1.0, seed=1),
        SD1_SELF_ATTN_Q: lora_factors(8, 8, 4, alpha=4.0, seed=2),
        SD1_TE_Q: lora_factors(8, 8, 2, seed=3),
    }
    path = write_kohya_file(tmp_path / "a.safetensors", modules, "sd1")
    lora = read_lora(path)
    assert lora.format == "kohya"
    assert lora.arch == "sd1"  # from attn2.to_k input width 768
    assert set(lora.modules) == set(modules)
    for target, factors in modules.items():
        assert close(lora.modules[target].delta_weight(), lora_formula(factors))
    assert lora.modules[SD1_CROSS_ATTN_K].alpha == 1.0
    assert lora.modules[SD1_TE_Q].alpha == 2.0  # no alpha key: alpha = rank
    assert lora.components() == {"unet", "text_encoder"}


def test_kohya_sd1_ldm_style_names(tmp_path):
    factors = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": lora_factors(8, 768, 2, alpha=2, seed=1),
        "lora_unet_output_blocks_2_1_conv": lora_factors(8, 8, 2, kernel=(3, 3), seed=2),
        "lora_unet_middle_block_2_in_layers_2": lora_factors(8, 8, 2, kernel=(3, 3), seed=3),
        "lora_unet_input_blocks_3_0_op": lora_factors(8, 8, 2, kernel=(3, 3), seed=4),
        "lora_unet_output_blocks_5_0_skip_connection": lora_factors(8, 8, 2, kernel=(1, 1), seed=5),
        "lora_te_encoder_layers_3_mlp_fc1": lora_factors(8, 8, 2, seed=6),
    }
    path = write_file(tmp_path / "b.safetensors",
                      {f"{name}.{role}": t for name, f in factors.items() for role, t in f.items()},
                      metadata={"ss_base_model_version": "sd_v1"})
    lora = read_lora(path)
    expected_targets = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": SD1_CROSS_ATTN_K,
        "lora_unet_output_blocks_2_1_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_middle_block_2_in_layers_2": "unet.mid_block.resnets.1.conv1",
        "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_5_0_skip_connection": "unet.up_blocks.1.resnets.2.conv_shortcut",
        "lora_te_encoder_layers_3_mlp_fc1": "text_encoder.text_model.encoder.layers.3.mlp.fc1",
    }
    assert set(lora.modules) == set(expected_targets.values())
    assert lora.arch == "sd1"
    for name, target in expected_targets.items():
        assert close(lora.modules[target].delta_weight(), lora_formula(factors[name]))


def test_kohya_sdxl_te1_te2_and_ldm_unet(tmp_path):
    names = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0": "unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
        "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_0_proj": "unet.up_blocks.0.attentions.0.transformer_blocks.3.ff.net.0.proj",
        "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
    }
    factors = {name: lora_factors(8, 8, 2, alpha=1, seed=i) for i, name in enumerate(names)}
    path = write_file(tmp_path / "xl.safetensors",
                      {f"{n}.{role}": t for n, f in factors.items() for role, t in f.items()})
    lora = read_lora(path)
    assert lora.arch == "sdxl"  # no metadata: te2 keys tell
    assert set(lora.modules) == set(names.values())
    for name, target in names.items():
        assert close(lora.modules[target].delta_weight(), lora_formula(factors[name]))


@pytest.mark.parametrize("metadata, width, arch", [
    ({"ss_v2": "True"}, 8, "sd2"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, 8, "sdxl"),
    ({"loraclr_arch": "sd2"}, 8, "sd2"),
    ({}, 1024, "sd2"),
    ({}, 2048, "sdxl"),
    ({}, 64, None),
])
def test_arch_detection(tmp_path, metadata, width, arch):
    path = write_kohya_file(tmp_path / "x.safetensors", {SD1_CROSS_ATTN_K: lora_factors(8, width, 2)}, "sd1", metadata)
    assert read_lora(path).arch == arch


# --- diffusers / PEFT ----------------------------------------------------------------


def test_diffusers_peft_keys_with_alpha(tmp_path):
    modules = {
        SD1_SELF_ATTN_Q: lora_factors(8, 8, 2, alpha=4.0, seed=1),
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2": lora_factors(8, 16, 2, alpha=1.0, seed=2),
    }
    lora = read_lora(write_diffusers_file(tmp_path / "d.safetensors", modules))
    assert lora.format == "diffusers"
    assert set(lora.modules) == set(modules)
    for target, factors in modules.items():
        assert close(lora.modules[target].delta_weight(), lora_formula(factors))


@pytest.mark.parametrize("adapter_name", [None, "default"])
def test_peft_prefix_and_adapter_config_alpha(tmp_path, adapter_name):
    unet_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    factors = {unet_path: lora_factors(8, 768, 4, seed=1)}
    path = write_peft_folder(tmp_path / "unet_adapter", factors, lora_alpha=8, r=4,
                             target_modules=["to_k", "to_v"], adapter_name=adapter_name)
    lora = read_lora(path)
    assert lora.format == "peft"
    module = lora.modules["unet." + unet_path]
    assert module.alpha == 8.0
    f = factors[unet_path]
    assert close(module.delta_weight(), 2.0 * f["lora_up.weight"] @ f["lora_down.weight"])
    assert lora.arch == "sd1"


def test_peft_text_encoder_from_target_modules(tmp_path):
    te_path = "text_model.encoder.layers.0.self_attn.k_proj"
    path = write_peft_folder(tmp_path / "te", {te_path: lora_factors(8, 8, 2, seed=1)},
                             lora_alpha=2, r=2, target_modules=["k_proj", "q_proj"])
    assert set(read_lora(path).modules) == {"text_encoder." + te_path}


def test_old_diffusers_processor_and_lora_linear_layer_keys(tmp_path):
    attn = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
    unet_modules = {f"{attn}.to_k": lora_factors(8, 8, 2, seed=1), f"{attn}.to_out.0": lora_factors(8, 8, 2, seed=2)}
    te_modules = {"text_encoder.text_model.encoder.layers.0.mlp.fc1": lora_factors(16, 8, 2, seed=3)}
    p1 = write_processor_file(tmp_path / "proc.safetensors", unet_modules)
    p2 = write_diffusers_file(tmp_path / "te.safetensors", te_modules, style="lora_linear_layer")
    for path, modules in ((p1, unet_modules), (p2, te_modules)):
        lora = read_lora(path)
        assert set(lora.modules) == set(modules)
        for target, factors in modules.items():
            assert close(lora.modules[target].delta_weight(), lora_formula(factors))  # no alpha: scale 1


# --- LyCORIS module types ----------------------------------------------------------------


def test_locon_3x3_low_rank_applies_as_two_convs(tmp_path):
    factors = lora_factors(6, 5, 3, alpha=1.5, kernel=(3, 3), seed=1)
    lora = read_lora(write_kohya_file(tmp_path / "c.safetensors", {SD1_RESNET_CONV: factors}, "sd1"))
    module = lora.modules[SD1_RESNET_CONV]
    expected = 0.5 * torch.einsum("or,rikl->oikl", factors["lora_up.weight"][:, :, 0, 0], factors["lora_down.weight"])
    assert close(module.delta_weight(), expected)
    assert module.weight_shape == (6, 5, 3, 3)
    up, down = module.low_rank()
    x = torch.randn(1, 5, 7, 7)
    assert close(F.conv2d(F.conv2d(x, down, padding=1), up), F.conv2d(x, expected, padding=1))


def test_locon_tucker_mid(tmp_path):
    factors = lora_factors(6, 5, 3, alpha=3, kernel=(3, 3), tucker=True, seed=2)
    module = read_lora(write_kohya_file(tmp_path / "t.safetensors", {SD1_RESNET_CONV: factors}, "sd1")).modules[SD1_RESNET_CONV]
    up, mid, down = (factors[k].flatten(1) if k != "lora_mid.weight" else factors[k]
                     for k in ("lora_up.weight", "lora_mid.weight", "lora_down.weight"))
    expected = torch.zeros(6, 5, 3, 3)
    for o in range(6):
        for i in range(5):
            expected[o, i] = sum(up[o, n] * mid[n, m] * down[m, i] for n in range(3) for m in range(3))
    assert close(module.delta_weight(), expected)
    up_lr, down_lr = module.low_rank()
    assert down_lr.shape == (3, 5, 3, 3) and up_lr.shape == (6, 3, 1, 1)
    assert close((up_lr.flatten(1) @ down_lr.flatten(1)).reshape(6, 5, 3, 3), expected)


def test_loha_linear_and_flattened_conv(tmp_path):
    linear = loha_factors(8, 6, 2, alpha=1.0, seed=1)
    conv = loha_factors(4, 3, 2, alpha=4.0, kernel=(3, 3), seed=2)
    lora = read_lora(write_kohya_file(tmp_path / "h.safetensors", {SD1_SELF_ATTN_Q: linear, SD1_RESNET_CONV: conv}, "sd1"))
    for target, f, scale in ((SD1_SELF_ATTN_Q, linear, 0.5), (SD1_RESNET_CONV, conv, 2.0)):
        expected = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * scale
        module = lora.modules[target]
        assert module.kind == "loha" and module.rank == 2
        assert close(module.delta_weight(), expected.reshape(module.weight_shape))
    assert lora.modules[SD1_RESNET_CONV].weight_shape == (4, 3, 3, 3)  # kernel from the target name


def test_loha_tucker(tmp_path):
    f = loha_factors(4, 3, 2, alpha=2.0, kernel=(3, 3), tucker=True, seed=3)
    module = read_lora(write_kohya_file(tmp_path / "ht.safetensors", {SD1_RESNET_CONV: f}, "sd1")).modules[SD1_RESNET_CONV]

    def rebuild(n):
        t, a, b = f[f"hada_t{n}"], f[f"hada_w{n}_a"], f[f"hada_w{n}_b"]
        out = torch.zeros(4, 3, 3, 3)
        for i in range(2):
            for j in range(2):
                out += a[i][:, None, None, None] * b[j][None, :, None, None] * t[i, j]
        return out

    assert close(module.delta_weight(), rebuild(1) * rebuild(2))


def test_lokr_full_factors_have_scale_one(tmp_path):
    f = lokr_factors((2, 3), (4, 5), alpha=100.0, seed=1)
    module = read_lora(write_kohya_file(tmp_path / "k.safetensors", {SD1_SELF_ATTN_Q: f}, "sd1")).modules[SD1_SELF_ATTN_Q]
    expected = torch.zeros(8, 15)
    for a in range(2):
        for c in range(3):
            expected[a * 4:(a + 1) * 4, c * 5:(c + 1) * 5] = f["lokr_w1"][a, c] * f["lokr_w2"]
    assert close(module.delta_weight(), expected)


def test_lokr_decomposed_factors_scale(tmp_path):
    f = lokr_factors((2, 3), (4, 5), rank=2, alpha=1.0, decompose_w1=True, decompose_w2=True, seed=2)
    module = read_lora(write_kohya_file(tmp_path / "k.safetensors", {SD1_SELF_ATTN_Q: f}, "sd1")).modules[SD1_SELF_ATTN_Q]
    w1, w2 = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2_a"] @ f["lokr_w2_b"]
    assert module.rank == 2
    assert close(module.delta_weight(), 0.5 * torch.kron(w1, w2))


def test_lokr_conv_tucker(tmp_path):
    f = lokr_factors((2, 2), (3, 4, 3, 3), rank=2, alpha=2.0, tucker=True, seed=3)
    module = read_lora(write_kohya_file(tmp_path / "k.safetensors", {SD1_RESNET_CONV: f}, "sd1")).modules[SD1_RESNET_CONV]
    w2 = torch.einsum("ijkl,ib,jd->bdkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    expected = torch.zeros(6, 8, 3, 3)
    for a in range(2):
        for c in range(2):
            expected[a * 3:(a + 1) * 3, c * 4:(c + 1) * 4] = f["lokr_w1"][a, c] * w2
    assert close(module.delta_weight(), expected)  # scale alpha/rank = 1


def test_full_diff_keeps_bias(tmp_path):
    diff, diff_b = torch.randn(8, 8), torch.randn(8)
    module = read_lora(write_kohya_file(tmp_path / "f.safetensors", {SD1_SELF_ATTN_Q: {"diff": diff, "diff_b": diff_b}}, "sd1")).modules[SD1_SELF_ATTN_Q]
    assert module.kind == "full"
    assert torch.equal(module.delta_weight(), diff)
    assert torch.equal(module.tensors["diff_b"], diff_b)


# --- pickle files and refusals ------------------------------------------------------------


def test_pt_file_of_tensors_is_read(tmp_path):
    f = lora_factors(8, 8, 2, alpha=1, seed=4)
    path = tmp_path / "p.pt"
    torch.save({f"lora_unet_down_blocks_0_attentions_0_proj_in.{r}": t for r, t in f.items()}, path)
    module = read_lora(str(path)).modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert close(module.delta_weight(), lora_formula(f))


class _Payload:
    """Unpickling this would write a marker file: weights_only loading must never run it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "payload": _Payload()}, path)
    with pytest.raises(LoraFormatError, match="evil.pt.*weights_only"):
        read_lora(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()


def test_truncated_file_is_refused(tmp_path):
    path = write_kohya_file(tmp_path / "full.safetensors", {SD1_SELF_ATTN_Q: lora_factors(64, 64, 8)}, "sd1")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFormatError, match="cut.safetensors"):
        read_lora(str(cut))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(LoraFormatError, match="junk.bin"):
        read_lora(str(junk))


@pytest.mark.parametrize("tensors, bad", [
    ({"lora_unet_x_attn1_to_q.oft_blocks": torch.zeros(2, 2, 2), "lora_unet_x_attn1_to_q.alpha": torch.tensor(1.0)}, "lora_unet_x_attn1_to_q"),
    ({"lora_unet_y_attn1_to_k.weight": torch.zeros(4), "lora_unet_y_attn1_to_k.on_input": torch.tensor(0.0)}, "lora_unet_y_attn1_to_k"),
    ({"lora_te_z_q_proj.a1.weight": torch.zeros(2, 2), "lora_te_z_q_proj.a2.weight": torch.zeros(2, 2),
      "lora_te_z_q_proj.b1.weight": torch.zeros(2, 2), "lora_te_z_q_proj.b2.weight": torch.zeros(2, 2)}, "lora_te_z_q_proj"),
    ({"unet.a.to_q.lora_A.weight": torch.zeros(2, 4)}, "unet.a.to_q"),  # down without up
])
def test_unknown_module_type_names_file_and_key(tmp_path, tensors, bad):
    path = write_file(tmp_path / "odd.safetensors", tensors)
    with pytest.raises(LoraFormatError) as err:
        read_lora(path)
    assert "odd.safetensors" in str(err.value) and bad in str(err.value)


def test_mismatched_factor_shapes_are_refused(tmp_path):
    f = {"lora_up.weight": torch.zeros(8, 3), "lora_down.weight": torch.zeros(2, 8)}
    with pytest.raises(LoraFormatError, match="shapes"):
        read_lora(write_kohya_file(tmp_path / "s.safetensors", {SD1_SELF_ATTN_Q: f}, "sd1"))


def test_mixed_architectures_are_refused(tmp_path):
    sd1 = read_lora(write_kohya_file(tmp_path / "one.safetensors", {SD1_CROSS_ATTN_K: lora_factors(8, 768, 2)}, "sd1"))
    xl = read_lora(write_kohya_file(tmp_path / "xl.safetensors", {SD1_SELF_ATTN_Q: lora_factors(8, 8, 2)}, "sdxl",
                                    {"ss_base_model_version": "sdxl_base_v1-0"}))
    unknown = read_lora(write_kohya_file(tmp_path / "u.safetensors", {SD1_SELF_ATTN_Q: lora_factors(8, 8, 2)}, "sd1"))
    assert check_same_arch([sd1, unknown]) == "sd1"
    with pytest.raises(ArchMismatchError, match=r"one \(sd1\).*xl \(sdxl\)"):
        check_same_arch([sd1, xl])


# --- triggers and describe -----------------------------------------------------------------


def test_triggers_from_sidecar_then_tag_frequency(tmp_path):
    tags = {"10_sks": {"sks dog": 10, "grass": 3, "ball": 6, "sky": 1}, "reg": {"grass": 5}}
    meta = {"ss_tag_frequency": json.dumps(tags)}
    path = write_kohya_file(tmp_path / "dog.safetensors", {SD1_TE_Q: lora_factors(8, 8, 2)}, "sd1", meta)
    assert read_lora(path).triggers == ["sks dog", "grass", "ball"]
    (tmp_path / "dog.json").write_text(json.dumps({"activation text": "sks dog,  red collar ,"}))
    assert read_lora(path).triggers == ["sks dog", "red collar"]


def test_describe(tmp_path):
    modules = {
        SD1_CROSS_ATTN_K: lora_factors(8, 768, 4, alpha=2, seed=1),
        SD1_RESNET_CONV: loha_factors(4, 3, 2, alpha=2, kernel=(3, 3), seed=2),
        SD1_TE_Q: lora_factors(8, 8, 8, alpha=2, seed=3),
    }
    info = describe(read_lora(write_kohya_file(tmp_path / "d.safetensors", modules, "sd1")))
    assert info["format"] == "kohya" and info["arch"] == "sd1"
    assert info["module_kinds"] == {"lora": 2, "loha": 1}
    assert (info["rank_min"], info["rank_max"]) == (2, 8)
    assert info["alpha"] == 2.0
    assert info["layers"] == {"unet": 2, "text_encoder": 1}
    assert info["has_text_encoder"] is True
    assert info["triggers"] == []
