"""SDXL's OpenCLIP text encoder in the A1111 stand-in: its packed q/k/v, its never-called
out_proj and its sequence-first MLP are separate layers to our runtime, with the right numbers.

Known answer: the same deltas merged into the packed weights by hand (``in_proj_weight`` rows
q | k | v, ``out_proj.weight``, ``c_fc``/``c_proj``), run through OpenCLIP's own forward.
"""
import torch

from lib_loraclr.lora.base import LoraFile
from lib_loraclr.lora.modules import LoraUpDown

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def te2_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for block in (0, 1):
        for layer in LAYERS:
            target = f"text_encoder_2.text_model.encoder.layers.{block}.{layer}"
            out_features, in_features = model.targets()[target].weight.shape
            modules[target] = LoraUpDown(target, tensors={  # alpha = rank: delta = up @ down
                "lora_up.weight": torch.randn(out_features, 2, generator=generator) * 0.2,
                "lora_down.weight": torch.randn(2, in_features, generator=generator) * 0.2,
                "alpha": torch.tensor(2.0),
            })
    return LoraFile("/loras/te2.safetensors", "kohya", "sdxl", modules)


def merged_by_hand(open_clip, lora, multiplier):
    """Add multiplier * up @ down into OpenCLIP's own packed tensors; returns the originals."""
    saved = {}
    for target, module in lora.modules.items():
        block, layer = target.split("layers.")[1].split(".", 1)
        resblock = open_clip.transformer.resblocks[int(block)]
        width = resblock.attn.embed_dim
        tensors = module.tensors
        delta = multiplier * tensors["lora_up.weight"] @ tensors["lora_down.weight"]
        if layer.startswith("self_attn.") and layer != "self_attn.out_proj":
            index = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj").index(layer)
            weight, rows = resblock.attn.in_proj_weight, slice(index * width, (index + 1) * width)
        else:
            weight = {"self_attn.out_proj": resblock.attn.out_proj, "mlp.fc1": resblock.mlp.c_fc,
                      "mlp.fc2": resblock.mlp.c_proj}[layer].weight
            rows = slice(None)
        saved.setdefault(id(weight), (weight, weight.detach().clone()))
        with torch.no_grad():
            weight[rows] += delta
    return saved


def test_openclip_layers_take_a_lora_exactly_and_leave_openclip_as_it_was(a1111_sdxl):
    from lib_loraclr.hosts.webui_host import current_host
    from lib_loraclr.runtime import LoraRuntime

    model = current_host().model()
    model.image_size = (64, 64)
    open_clip = model._open_clip["text_encoder_2"]
    blocks = list(open_clip.transformer.resblocks)
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        plain = model.encode(prompts)
    lora = te2_lora(model)
    runtime = LoraRuntime(model.targets(), [lora], [0.7], attach=False)
    calls = []
    view = model.targets()["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"]
    handle = view.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    with torch.no_grad(), runtime.attached():
        assert all("forward" in block.__dict__ for block in blocks)
        ours = model.encode(prompts)
    handle.remove()
    assert not any("forward" in block.__dict__ for block in blocks)  # OpenCLIP's own forward again
    assert calls and all(shape[0] == 2 and shape[1] == 77 for shape in calls)  # batch-first rows
    with torch.no_grad():
        assert torch.equal(model.encode(prompts).context, plain.context)
    saved = merged_by_hand(open_clip, lora, 0.7)
    try:
        with torch.no_grad():
            expected = model.encode(prompts)
    finally:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)
    width_l = model.text_encoders["text_encoder"].config.hidden_size
    moved = (expected.context[..., width_l:] - plain.context[..., width_l:]).abs().max()
    assert moved > 1e-2  # the LoRA does change text_encoder_2's states
    torch.testing.assert_close(ours.context, expected.context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, expected.pooled, rtol=1e-5, atol=1e-5)
