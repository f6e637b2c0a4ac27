"""backend.patcher.lora: LoRA key maps, state-dict -> patches, and the LoraLoader that merges them.

Behaviour kept from Forge: ``model_lora_keys_unet(kmodel)`` maps kohya names of both layouts
(``lora_unet_down_blocks_0_attentions_0_...`` via the diffusers<->ldm table, and
``lora_unet_input_blocks_1_1_...``), diffusers names (``unet.down_blocks...to_k`` /
``...processor.to_k``) and plain ``diffusion_model.<path>`` to parameter keys
``diffusion_model.<ldm path>.weight``. ``model_lora_keys_clip(joint_text_encoder)`` maps
``lora_te_text_model_encoder_layers_N_<attn|mlp>``, ``lora_te1_...`` and
``text_encoder.text_model.encoder.layers.N.<...>`` to ``clip_l.transformer.text_model...weight``;
SDXL's clip_g: ``lora_te2_...`` / ``text_encoder_2.text_model...`` to ``clip_g.transformer...weight``.
``load_lora(sd, key_map)`` -> (patches, unmatched keys). ``LoraLoader.refresh`` runs under
``torch.inference_mode()``, backs up the original Parameters, and REPLACES each patched
parameter by a new ``Parameter(merged, requires_grad=False)`` (an inference tensor); when the
patch set changes it restores the original Parameter objects first.
Supported patch types: ``lora`` (lora_up/lora_down/alpha, lora_A/lora_B, ``_lora.up``, optional
``lora_mid``), ``diff`` (``.diff``, ``.diff_b``), ``set``. Not simulated: LoHa/LoKr/GLoRA/DoRA/OFT.
"""
import torch

from backend import memory_management, utils

extra_weight_calculators = {}

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}

_RESNET_MAP = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))

_TRANSFORMER_LEAVES = ("norm", "proj_in", "proj_out")
_BLOCK_LEAVES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")


def unet_to_diffusers(unet_config):
    """{diffusers key: ldm key} (``.weight`` and ``.bias``) for an SD1/SD2/SDXL-style UNet config."""
    num_res_blocks = unet_config["num_res_blocks"]
    channel_mult = unet_config["channel_mult"]
    if isinstance(num_res_blocks, int):
        num_res_blocks = [num_res_blocks] * len(channel_mult)
    transformer_depth = list(unet_config["transformer_depth"])
    transformer_depth_output = list(unet_config["transformer_depth_output"])
    middle_depth = unet_config.get("transformer_depth_middle", 1)
    pairs = []

    def resnet(ldm, dif):
        for a, b in _RESNET_MAP:
            pairs.append((f"{dif}.{b}", f"{ldm}.{a}"))

    def attention(ldm, dif, depth):
        for leaf in _TRANSFORMER_LEAVES:
            pairs.append((f"{dif}.{leaf}", f"{ldm}.{leaf}"))
        for t in range(depth):
            for leaf in _BLOCK_LEAVES:
                pairs.append((f"{dif}.transformer_blocks.{t}.{leaf}", f"{ldm}.transformer_blocks.{t}.{leaf}"))

    pairs += [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
              ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    if unet_config.get("num_classes") is not None:
        # comfy's UNET_MAP_BASIC: label_emb as diffusers' class_embedding / add_embedding (SDXL's
        # ADM). Comfy lists them for every UNet; the harness only where label_emb exists.
        pairs += [("class_embedding.linear_1", "label_emb.0.0"), ("class_embedding.linear_2", "label_emb.0.2"),
                  ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    n = 1
    for level in range(len(channel_mult)):
        for j in range(num_res_blocks[level]):
            resnet(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}")
            depth = transformer_depth.pop(0) if transformer_depth else 0
            if depth:
                attention(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", depth)
            n += 1
        if level != len(channel_mult) - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
            n += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    if middle_depth >= 0:
        attention("middle_block.1", "mid_block.attentions.0", max(middle_depth, 1))
        resnet("middle_block.2", "mid_block.resnets.1")
    n = 0
    for i, level in enumerate(reversed(range(len(channel_mult)))):
        for j in range(num_res_blocks[level] + 1):
            resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            depth = transformer_depth_output.pop() if transformer_depth_output else 0
            if depth:
                attention(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", depth)
            if level and j == num_res_blocks[level]:
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if depth else 1}.conv"))
            n += 1
    out = {}
    for dif, ldm in pairs:
        for suffix in (".weight", ".bias"):
            out[dif + suffix] = ldm + suffix
    return out


def model_lora_keys_unet(model, key_map={}):
    sdk = model.state_dict().keys()
    for k in sdk:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map[f"lora_unet_{key_lora}"] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    diffusers_keys = unet_to_diffusers(model.diffusion_model.config)
    for k, v in diffusers_keys.items():
        if k.endswith(".weight"):
            unet_key = f"diffusion_model.{v}"
            key_lora = k[:-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = unet_key
            key_map[f"lycoris_{key_lora}"] = unet_key
            for prefix in ("", "unet."):
                diffusers_lora_key = "{}{}".format(prefix, k[:-len(".weight")].replace(".to_", ".processor.to_"))
                if diffusers_lora_key.endswith(".to_out.0"):
                    diffusers_lora_key = diffusers_lora_key[:-2]
                key_map[diffusers_lora_key] = unet_key
    return key_map


def model_lora_keys_clip(model, key_map={}):
    """As Forge's packages_3rdparty/comfyui_lora_collection/lora.py: clip_l gets ``lora_te_`` /
    ``lora_te1_`` / ``text_encoder.``; clip_g, when clip_l is present (SDXL base), gets ``lora_te2_``
    / ``text_encoder_2.`` (without clip_l, as the SDXL refiner: ``lora_te_`` / ``text_encoder.`` /
    ``lora_prior_te_``); ``clip_g.transformer.text_projection`` -> ``lora_te2_text_projection`` and
    ``lora_prior_te_text_projection``."""
    sdk = model.state_dict().keys()
    clip_l_present = False
    for b in range(32):
        for c, lora_c in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_c}"] = k
                clip_l_present = True
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                if clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_c}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                    key_map[f"lora_prior_te_text_model_encoder_layers_{b}_{lora_c}"] = k
    k = "clip_g.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_prior_te_text_projection"] = k
        key_map["lora_te2_text_projection"] = k
    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k
    return key_map


def load_lora(lora, to_load):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha_name = f"{x}.alpha"
        alpha = None
        if alpha_name in lora:
            alpha = lora[alpha_name].item()
            loaded_keys.add(alpha_name)
        up_down = None
        for up, down, mid in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"),
                              (f"{x}_lora.up.weight", f"{x}_lora.down.weight", None),
                              (f"{x}.lora_B.weight", f"{x}.lora_A.weight", None),
                              (f"{x}.lora.up.weight", f"{x}.lora.down.weight", None),
                              (f"{x}.lora_linear_layer.up.weight", f"{x}.lora_linear_layer.down.weight", None)):
            if up in lora:
                up_down = (up, down, mid)
                break
        if up_down is not None:
            up, down, mid_name = up_down
            mid = None
            if mid_name is not None and mid_name in lora:
                mid = lora[mid_name]
                loaded_keys.add(mid_name)
            patch_dict[to_load[x]] = ("lora", (lora[up], lora[down], alpha, mid, None))
            loaded_keys.update((up, down))
        diff_name = f"{x}.diff"
        if diff_name in lora:
            patch_dict[to_load[x]] = ("diff", (lora[diff_name],))
            loaded_keys.add(diff_name)
        diff_bias_name = f"{x}.diff_b"
        if diff_bias_name in lora:
            patch_dict["{}.bias".format(to_load[x][:-len(".weight")])] = ("diff", (lora[diff_bias_name],))
            loaded_keys.add(diff_bias_name)
        set_weight_name = f"{x}.set_weight"
        if set_weight_name in lora:
            patch_dict[to_load[x]] = ("set", (lora[set_weight_name],))
            loaded_keys.add(set_weight_name)
    remaining_dict = {x: y for x, y in lora.items() if x not in loaded_keys}
    return patch_dict, remaining_dict


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    weight_dtype_backup = None
    if computation_dtype == weight.dtype:
        weight = weight.clone()
    else:
        weight_dtype_backup = weight.dtype
        weight = weight.to(dtype=computation_dtype)

    for strength, v, strength_model, offset, function in patches:
        if function is None:
            function = lambda a: a  # noqa: E731
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, list):
            v = (merge_lora_to_weight(v[1:], v[0].clone(), key),)
        if len(v) == 1:
            patch_type = "diff"
        else:
            patch_type, v = v[0], v[1]

        if patch_type == "diff":
            w1 = v[0]
            if strength != 0.0:
                if w1.shape != weight.shape:
                    print("WARNING SHAPE MISMATCH {} WEIGHT NOT MERGED {} != {}".format(key, w1.shape, weight.shape))
                else:
                    weight += strength * memory_management.cast_to_device(w1, weight.device, weight.dtype)
        elif patch_type == "set":
            weight.copy_(v[0])
        elif patch_type == "lora":
            mat1 = memory_management.cast_to_device(v[0], weight.device, computation_dtype)
            mat2 = memory_management.cast_to_device(v[1], weight.device, computation_dtype)
            alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
            if v[3] is not None:
                mat3 = memory_management.cast_to_device(v[3], weight.device, computation_dtype)
                final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
                mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1), mat3.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
            try:
                lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
                weight += function(((strength * alpha) * lora_diff).type(weight.dtype))
            except Exception as e:
                print("ERROR {} {} {}".format(patch_type, key, e))
                raise e
        elif patch_type in extra_weight_calculators:
            weight = extra_weight_calculators[patch_type](weight, strength, v)
        else:
            print("patch type not recognized {} {}".format(patch_type, key))
        if old_weight is not None:
            weight = old_weight

    if weight_dtype_backup is not None:
        weight = weight.to(dtype=weight_dtype_backup)
    return weight


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device('cpu'), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return

        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches

        memory_management.signal_empty_cache = True

        # restore
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}

        # patch
        for (key, online_mode), current_patches in all_patches.items():
            try:
                parent_layer, child_key, weight = utils.get_attr_with_parent(self.model, key)
                assert isinstance(weight, torch.nn.Parameter)
            except Exception:
                raise ValueError(f"Wrong LoRA Key: {key}")
            if online_mode:
                if not hasattr(parent_layer, 'forge_online_loras'):
                    parent_layer.forge_online_loras = {}
                parent_layer.forge_online_loras[child_key] = current_patches
                self.online_backup.append(parent_layer)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))

        self.loaded_hash = hashes
