"""Writing kohya LoRA files: SVD round trips, naming, metadata, hashes, atomicity, diffusers."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lib_loraclr.lora import read_lora, safe_output_path, write_kohya_lora, write_sidecar
from lib_loraclr.lora import writer as writer_module
from lora_fixtures import SD1_CROSS_ATTN_K, SD1_RESNET_CONV, SD1_SELF_ATTN_Q, SD1_TE_Q


def low_rank_delta(shape, rank, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, int(torch.tensor(shape[1:]).prod()), generator=g)
    return flat.reshape(shape)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


DELTAS = {
    SD1_CROSS_ATTN_K: low_rank_delta((16, 24), 3, 1),
    SD1_RESNET_CONV: low_rank_delta((8, 6, 3, 3), 3, 2),
    "unet.down_blocks.0.attentions.0.proj_in": low_rank_delta((8, 8, 1, 1), 2, 3),
    SD1_TE_Q: low_rank_delta((12, 12), 3, 4),
}


def test_round_trip_exact_at_true_rank(tmp_path):
    path = str(tmp_path / "rt.safetensors")
    report = write_kohya_lora(path, DELTAS, "sd1", rank=4, conv_rank=5, clamp_quantile=None, dtype=torch.float32)
    lora = read_lora(path)
    assert set(lora.modules) == set(DELTAS)
    for target, delta in DELTAS.items():
        assert lora.modules[target].delta_weight().shape == delta.shape
        assert rel_err(lora.modules[target].delta_weight(), delta) < 1e-5
        assert report["errors"][target] < 1e-5
    assert report["ranks"][SD1_RESNET_CONV] == 5 and report["ranks"][SD1_TE_Q] == 4
    up, down = lora.modules[SD1_RESNET_CONV].low_rank()
    assert up.shape == (8, 5, 1, 1) and down.shape == (5, 6, 3, 3)


def test_round_trip_full_rank_within_svd_tolerance(tmp_path):
    delta = torch.randn(10, 7, generator=torch.Generator().manual_seed(5))
    path = str(tmp_path / "full.safetensors")
    report = write_kohya_lora(path, {SD1_SELF_ATTN_Q: delta}, "sd1", energy=1.0, clamp_quantile=None, dtype=torch.float32)
    assert report["ranks"][SD1_SELF_ATTN_Q] == 7
    assert rel_err(read_lora(path).modules[SD1_SELF_ATTN_Q].delta_weight(), delta) < 1e-5


def test_energy_picks_rank_and_max_rank_caps(tmp_path):
    q_out, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(6)))
    q_in, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(7)))
    singular = torch.tensor([10.0, 5.0, 1.0] + [0.01] * 17)
    delta = q_out @ torch.diag(singular) @ q_in.T
    # energies: 100/126 = 0.79, 125/126 = 0.992, 126/126
    r1 = write_kohya_lora(str(tmp_path / "a.safetensors"), {SD1_SELF_ATTN_Q: delta}, "sd1", energy=0.95,
                          clamp_quantile=None, dtype=torch.float32)
    r2 = write_kohya_lora(str(tmp_path / "b.safetensors"), {SD1_SELF_ATTN_Q: delta}, "sd1", energy=0.995)
    r3 = write_kohya_lora(str(tmp_path / "c.safetensors"), {SD1_SELF_ATTN_Q: delta}, "sd1", energy=0.995, max_rank=1)
    assert (r1["ranks"][SD1_SELF_ATTN_Q], r2["ranks"][SD1_SELF_ATTN_Q], r3["ranks"][SD1_SELF_ATTN_Q]) == (2, 3, 1)
    assert abs(r1["errors"][SD1_SELF_ATTN_Q] - (1.0 + 17e-4) ** 0.5 / 126 ** 0.5) < 2e-3


def test_clamp_bounds_factor_values(tmp_path):
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(8))
    delta[0, 0] = 500.0  # an outlier the clamp must cut
    path = str(tmp_path / "clamp.safetensors")
    write_kohya_lora(path, {SD1_SELF_ATTN_Q: delta}, "sd1", rank=32, clamp_quantile=0.9, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        up, down = f.get_tensor(f"{name}.lora_up.weight"), f.get_tensor(f"{name}.lora_down.weight")
    u, s, vh = torch.linalg.svd(delta)
    values = torch.cat([(u * s).flatten(), vh.flatten()]).abs()
    bound = float(torch.kthvalue(values, round(0.9 * values.numel())).values)
    assert float(torch.cat([up.flatten(), down.flatten()]).abs().max()) == pytest.approx(bound, rel=1e-4)


def test_sdxl_names_and_metadata(tmp_path):
    deltas = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": low_rank_delta((8, 8), 2, 1),
        "text_encoder_2.text_model.encoder.layers.5.mlp.fc1": low_rank_delta((16, 8), 2, 2),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": low_rank_delta((8, 2048), 2, 3),
        "unet.up_blocks.0.upsamplers.0.conv": low_rank_delta((8, 8, 3, 3), 2, 4),
        "unet.mid_block.resnets.1.conv2": low_rank_delta((8, 8, 3, 3), 2, 5),
    }
    path = str(tmp_path / "xl.safetensors")
    write_kohya_lora(path, deltas, "sdxl", rank=2, metadata={"loraclr_sources": ["a", "b"], "note": "hi"})
    with safe_open(path, "pt") as f:
        keys = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert keys == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_5_mlp_fc1",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_middle_block_2_out_layers_3",
    }
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
    assert meta["ss_output_name"] == "xl"
    assert json.loads(meta["loraclr_sources"]) == ["a", "b"] and meta["note"] == "hi"
    lora = read_lora(path)
    assert lora.arch == "sdxl" and set(lora.modules) == set(deltas)


def test_hashes_match_independent_computation(tmp_path):
    big = {SD1_SELF_ATTN_Q: low_rank_delta((512, 512), 512, 9)}  # > 1 MiB so the legacy window has data
    path = str(tmp_path / "h.safetensors")
    write_kohya_lora(path, big, "sd2", rank=512, metadata={"free": "text"})
    data = open(path, "rb").read()
    header_len = int.from_bytes(data[:8], "little")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"


def test_existing_file_kept_unless_overwrite(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"original")
    with pytest.raises(FileExistsError, match="x.safetensors"):
        write_kohya_lora(str(path), DELTAS, "sd1", rank=2)
    assert path.read_bytes() == b"original"
    write_kohya_lora(str(path), DELTAS, "sd1", rank=2, overwrite=True)
    assert set(read_lora(str(path)).modules) == set(DELTAS)


def test_failure_mid_write_leaves_no_temp_and_original_untouched(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"original")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_kohya_lora(str(path), DELTAS, "sd1", rank=2, overwrite=True)
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert path.read_bytes() == b"original"


def test_sidecar(tmp_path):
    path = str(tmp_path / "dog.safetensors")
    write_kohya_lora(path, DELTAS, "sd1", rank=2)
    sidecar = write_sidecar(path, "sks dog, red collar", description="merged")
    data = json.loads(open(sidecar, encoding="utf-8").read())
    assert data == {"description": "merged", "sd version": "SD1", "activation text": "sks dog, red collar",
                    "preferred weight": 1.0}
    assert read_lora(path).triggers == ["sks dog", "red collar"]
    with pytest.raises(FileExistsError):
        write_sidecar(path, "other")
    write_sidecar(path, "other", preferred_weight=0.8, overwrite=True)
    assert json.loads(open(sidecar, encoding="utf-8").read())["preferred weight"] == 0.8


@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", "..", "../x", "x..y"])
def test_safe_output_path_rejects(tmp_path, name):
    with pytest.raises(ValueError, match="invalid output file name"):
        safe_output_path(str(tmp_path), name)


def test_safe_output_path_accepts(tmp_path):
    assert safe_output_path(str(tmp_path), "my merge") == os.path.join(str(tmp_path), "my merge.safetensors")
    assert safe_output_path(str(tmp_path), "m.safetensors") == os.path.join(str(tmp_path), "m.safetensors")


def test_zero_deltas_skipped_and_unknown_arch_refused(tmp_path):
    report = write_kohya_lora(str(tmp_path / "z.safetensors"), {**DELTAS, SD1_SELF_ATTN_Q: torch.zeros(4, 4)}, "sd1", rank=2)
    assert report["skipped"] == [SD1_SELF_ATTN_Q]
    with pytest.raises(ValueError, match="sd3"):
        write_kohya_lora(str(tmp_path / "q.safetensors"), DELTAS, "sd3")


def _tiny_sd1_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import lib_loraclr

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, projection_dim=32,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=32,
    )
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(lib_loraclr.__file__), "assets", "clip_tokenizer"))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_diffusers_load_lora_weights_reads_our_file(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = _tiny_sd1_pipeline()
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    targets = [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "unet.down_blocks.0.attentions.1.proj_in",
        "unet.down_blocks.0.resnets.0.conv1",
        # diffusers infers the text-encoder key layout from out_proj (as in every kohya
        # file): a text-encoder part without out_proj fails or is silently dropped there.
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
        "text_encoder.text_model.encoder.layers.1.mlp.fc1",
    ]

    def module_of(target):
        component, module_path = target.split(".", 1)
        if component == "text_encoder" and not hasattr(pipe.text_encoder, "text_model"):
            module_path = module_path.removeprefix("text_model.")  # transformers 5 dropped the wrapper
        return modules[component].get_submodule(module_path)

    base, deltas = {}, {}
    for i, target in enumerate(targets):
        weight = module_of(target).weight
        base[target] = weight.detach().clone()
        deltas[target] = low_rank_delta(tuple(weight.shape), 2, 100 + i) * 0.01
    path = tmp_path / "ours.safetensors"
    write_kohya_lora(str(path), deltas, "sd1", rank=2, clamp_quantile=None, dtype=torch.float32)

    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for target in targets:
        merged = module_of(target).weight.detach()
        assert torch.allclose(merged, base[target] + deltas[target], atol=1e-5), target


def test_sdxl_names_agree_with_diffusers_converter(tmp_path):
    """diffusers' own kohya-SDXL converter maps our written keys back to our targets."""
    import re
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    targets = [
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
        "unet.down_blocks.1.attentions.0.proj_in",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
        "unet.up_blocks.0.upsamplers.0.conv",
        "unet.down_blocks.0.downsamplers.0.conv",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj",
    ]
    deltas = {t: low_rank_delta((8, 8, 3, 3) if t.endswith("conv") else (8, 8), 2, i) for i, t in enumerate(targets)}
    path = str(tmp_path / "xl.safetensors")
    write_kohya_lora(path, deltas, "sdxl", rank=2)
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    found = set()
    for key in converted:
        if key.endswith("down.weight"):
            path_ = re.sub(r"(\.lora|_lora|\.lora_linear_layer)\.down\.weight$", "", key).replace(".processor.", ".")
            path_ = re.sub(r"\.to_out$", ".to_out.0", path_)
            found.add(re.sub(r"\.to_([qkv])$", lambda m: f".{m.group(1)}_proj", path_) if ".text_model." in path_ else path_)
    assert found == set(targets)
