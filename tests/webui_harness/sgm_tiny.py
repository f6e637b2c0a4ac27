"""A tiny SDXL-architecture model in sgm (Stability-AI/generative-models) naming, without sgm / open_clip.

Mirrors, scaled down, the SDXL base config (``configs/inference/sd_xl_base.yaml``) and these files:

* ``sgm/modules/diffusionmodules/openaimodel.py`` ``UNetModel``: ``channel_mult (1, 2, 4)``,
  ``num_res_blocks 2``, ``attention_resolutions [4, 2]`` (NO attention in the first level, so
  SpatialTransformers sit at input_blocks 4, 5, 7, 8, middle_block 1, output_blocks 0..5),
  ``num_head_channels`` (heads = ch // num_head_channels), ``use_linear_in_transformer`` (Linear
  ``proj_in`` / ``proj_out``), per-level ``transformer_depth`` (tiny: 1, 1, 2; middle 2),
  ``num_classes="sequential"`` with ``label_emb.0.{0,2}`` fed ``y = vector``
  (``adm_in_channels`` = pooled width + 3 * 2 * outdim), Upsample at ``output_blocks.{2,5}.2``.
* ``sgm/modules/attention.py`` ``CrossAttention`` / ``BasicTransformerBlock`` / ``SpatialTransformer``:
  classes of their own (A1111's sdp optimization replaces ``sgm...CrossAttention.forward``
  separately from ldm's).
* ``sgm/modules/diffusionmodules/wrappers.py`` ``OpenAIWrapper``: ``forward(x, t, c)`` reads
  ``c["crossattn"]`` / ``c["vector"]`` / ``c["concat"]`` (A1111's ``c_concat`` is ignored).
* ``sgm/modules/encoders/modules.py`` ``GeneralConditioner`` (OUTPUT_DIM2KEYS, KEY2CATDIM,
  force_zero_embeddings), ``FrozenCLIPEmbedder`` (layer "hidden", layer_idx = penultimate),
  ``FrozenOpenCLIPEmbedder2`` (layer "penultimate", always_return_pooled, legacy False,
  ``encode_with_transformer`` permuting NLD -> LND for open_clip's sequence-first transformer),
  ``ConcatTimestepEmbedderND`` (original_size_as_tuple / crop_coords_top_left / target_size_as_tuple).
* open_clip 2.20.0 ``src/open_clip/transformer.py`` / ``model.py``: ``ResidualAttentionBlock``
  (``ln_1``, ``attn`` = ``nn.MultiheadAttention`` with packed ``in_proj_weight`` (batch_first
  False: input is (L, N, D)), ``ls_1``, ``ln_2``, ``mlp.c_fc`` / ``mlp.gelu`` / ``mlp.c_proj``,
  ``ls_2``), ``Transformer.resblocks``, and the CLIP text tower attributes ``token_embedding``,
  ``positional_embedding``, ``ln_final``, ``text_projection``, ``attn_mask`` (visual deleted).
* ``sgm/models/diffusion.py`` ``DiffusionEngine``: ``model`` (OpenAIWrapper), ``denoiser``
  (EpsScaling), ``conditioner``, ``first_stage_model``, ``scale_factor`` 0.13025,
  ``decode_first_stage`` / ``encode_first_stage``. A1111's additions (``get_learned_conditioning``,
  ``apply_model``, ``alphas_cumprod`` ...) come from ``modules/sd_models_xl.py`` of the stand-in.

Widths: UNet 32/64/128 channels, head channels 16, CLIP-L stand-in width 32 (3 layers), OpenCLIP
stand-in width 48 (2 layers, 2 heads, projection 40), ConcatTimestepEmbedderND outdim 8:
crossattn context 32 + 48 = 80, vector 40 + 6 * 8 = 88. Weights are random (seeded); the layers
sgm zero-initialises get random weights too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from webui_harness import ldm_tiny as _ldm

TOKENIZER_DIR = _ldm.TOKENIZER_DIR
timestep_embedding = _ldm.timestep_embedding
default = _ldm.default

# ----------------------------------------------------------------------------- sgm attention


class CrossAttention(nn.Module):
    """sgm.modules.attention.CrossAttention (same math as ldm's; a separate class as in sgm)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0, backend=None):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.backend = backend

    forward = _ldm._original_forward


_original_forward = CrossAttention.forward


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True, disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if self.disable_self_attn else None)
        self.ff = _ldm.FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """sgm SpatialTransformer; SDXL uses ``use_linear=True`` (Linear proj_in / proj_out on (b, hw, c))."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, disable_self_attn=False,
                 use_linear=False, attn_type="softmax", use_checkpoint=False):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, list):
            context_dim = [context_dim]
        if context_dim is not None and depth != len(context_dim):
            context_dim = depth * [context_dim[0]]
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = _ldm.Normalize(in_channels)
        if not use_linear:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        else:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)
        ])
        if not use_linear:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)  # zero_module() in sgm
        else:
            self.proj_out = nn.Linear(inner_dim, in_channels)  # zero_module() in sgm
        self.use_linear = use_linear

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            if i > 0 and len(context) == 1:
                i = 0  # use same context for each block
            x = block(x, context=context[i])
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


# ---------------------------------------------------------------------------------- sgm unet


class TimestepEmbedSequential(nn.Sequential, _ldm.TimestepBlock):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, _ldm.TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(_ldm.ResBlock):
    """sgm ResBlock (same layers as ldm's: in_layers / emb_layers / out_layers / skip_connection)."""


class Downsample(_ldm.Downsample):
    pass


class Upsample(_ldm.Upsample):
    pass


class UNetModel(nn.Module):
    """sgm.modules.diffusionmodules.openaimodel.UNetModel with the SDXL options (see module docstring)."""

    def __init__(self, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, attention_resolutions=(4, 2),
                 channel_mult=(1, 2, 4), num_head_channels=16, context_dim=80, transformer_depth=(1, 1, 2),
                 transformer_depth_middle=None, num_classes="sequential", adm_in_channels=88, use_linear_in_transformer=True,
                 dropout=0.0):
        super().__init__()
        if isinstance(transformer_depth, int):
            transformer_depth = len(channel_mult) * [transformer_depth]
        transformer_depth = list(transformer_depth)
        transformer_depth_middle = default(transformer_depth_middle, transformer_depth[-1])
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.num_head_channels = num_head_channels
        self.predict_codebook_ids = False
        self.dtype = torch.float32

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))

        if self.num_classes is not None:
            if num_classes != "sequential":
                raise NotImplementedError("harness: only num_classes='sequential' (SDXL) is simulated")
            assert adm_in_channels is not None
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))

        def transformer(ch, level):
            depth = transformer_depth_middle if level == "middle" else transformer_depth[level]
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, depth=depth, context_dim=context_dim,
                                      use_linear=use_linear_in_transformer)

        _ldm.build_unet_blocks(self, in_channels, out_channels, time_embed_dim, dropout, transformer,
                               blocks=(TimestepEmbedSequential, ResBlock, Downsample, Upsample))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None), "must specify y if and only if the model is class-conditional"
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)
        h = _ldm.run_unet_blocks(self, x, emb, context)
        h = h.type(x.dtype)
        return self.out(h)


class IdentityWrapper(nn.Module):
    def __init__(self, diffusion_model, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    def forward(self, x, t, c: dict, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None), **kwargs)


# --------------------------------------------------------------------------- denoiser scaling


class EpsScaling:
    """sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"""

    def __call__(self, sigma):
        c_skip = torch.ones_like(sigma, device=sigma.device)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling:
    def __call__(self, sigma):
        c_skip = 1.0 / (sigma ** 2 + 1.0)
        c_out = -sigma / (sigma ** 2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma ** 2 + 1.0) ** 0.5
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    def __init__(self, scaling):
        super().__init__()
        self.scaling = scaling


class LegacyDDPMDiscretization:
    """sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization (linear_start 0.00085, linear_end 0.012)."""

    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000):
        self.num_timesteps = num_timesteps
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).numpy()


# -------------------------------------------------------------------------------- embedders


class AbstractEmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self._is_trainable = None
        self._ucg_rate = None
        self._input_key = None

    @property
    def is_trainable(self):
        return self._is_trainable

    @is_trainable.setter
    def is_trainable(self, value):
        self._is_trainable = value

    @property
    def ucg_rate(self):
        return self._ucg_rate

    @ucg_rate.setter
    def ucg_rate(self, value):
        self._ucg_rate = value

    @property
    def input_key(self):
        return self._input_key

    @input_key.setter
    def input_key(self, value):
        self._input_key = value

    legacy_ucg_val = None

    def freeze(self):
        self.eval()
        for param in self.parameters():
            param.requires_grad = False


_TOKENIZER = None


def get_tokenizer():
    """The CLIP BPE tokenizer (lib_loraclr/assets/clip_tokenizer), loaded once and shared read-only:
    stands in for both the transformers CLIPTokenizer of embedders[0] and open_clip's SimpleTokenizer
    (the same 49408-entry vocabulary; open_clip names the specials ``<start_of_text>`` / ``<end_of_text>``)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import CLIPTokenizer
        _TOKENIZER = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    return _TOKENIZER


class FrozenCLIPEmbedder(AbstractEmbModel):
    """sgm.modules.encoders.modules.FrozenCLIPEmbedder: ``.tokenizer`` + ``.transformer`` (CLIPTextModel)."""

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(self, width=32, layers=3, heads=2, seed=0, max_length=77, layer="hidden", layer_idx=None, always_return_pooled=False):
        super().__init__()
        assert layer in self.LAYERS
        self.tokenizer = get_tokenizer()
        self.transformer = _ldm._make_clip_text_model(width, layers, heads, seed)
        self.device = "cpu"
        self.max_length = max_length
        self.freeze()
        self.layer = layer
        self.layer_idx = layer_idx if layer_idx is not None else layers - 1  # SDXL: 11 of 12 = penultimate
        self.return_pooled = always_return_pooled

    def forward(self, text):
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        outputs = self.transformer(input_ids=batch_encoding["input_ids"], output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        if self.return_pooled:
            return z, outputs.pooler_output
        return z


class LayerNorm(nn.LayerNorm):
    """open_clip.transformer.LayerNorm: computes in float32, returns the input dtype."""

    def forward(self, x):
        orig_type = x.dtype
        x = F.layer_norm(x.to(torch.float32), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class ResidualAttentionBlock(nn.Module):
    """open_clip 2.20.0 ResidualAttentionBlock (self-attention, sequence-first (L, N, D) input)."""

    def __init__(self, d_model, n_head, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.ln_1 = norm_layer(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ls_1 = nn.Identity()
        self.ln_2 = norm_layer(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", act_layer()),
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.ls_2 = nn.Identity()

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=LayerNorm):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
                                        for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class OpenCLIPTextModel(nn.Module):
    """The text half of open_clip's ``CLIP`` (what FrozenOpenCLIPEmbedder2 keeps after ``del model.visual``)."""

    def __init__(self, width=48, layers=2, heads=2, embed_dim=40, vocab_size=49408, context_length=77, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.transformer = Transformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=width ** -0.5)
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                    module.bias.copy_(0.2 + 0.1 * torch.randn(module.bias.shape, generator=g))
                elif isinstance(module, nn.MultiheadAttention):
                    module.in_proj_bias.copy_(0.05 * torch.randn(module.in_proj_bias.shape, generator=g))
                    module.out_proj.bias.copy_(0.05 * torch.randn(module.out_proj.bias.shape, generator=g))


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2 (``.model`` = the OpenCLIP text model)."""

    LAYERS = ["pooled", "last", "penultimate"]

    def __init__(self, width=48, layers=2, heads=2, embed_dim=40, seed=0, max_length=77, layer="penultimate",
                 always_return_pooled=True, legacy=False):
        super().__init__()
        assert layer in self.LAYERS
        self.model = OpenCLIPTextModel(width, layers, heads, embed_dim, seed=seed)
        self.device = "cpu"
        self.max_length = max_length
        self.return_pooled = always_return_pooled
        self.freeze()
        self.layer = layer
        if self.layer == "last":
            self.layer_idx = 0
        elif self.layer == "penultimate":
            self.layer_idx = 1
        else:
            raise NotImplementedError()
        self.legacy = legacy

    def forward(self, text):
        z = self.encode_with_transformer(tokenize(text))
        if not self.return_pooled and self.legacy:
            return z
        if self.return_pooled:
            assert not self.legacy
            return z[self.layer], z["pooled"]
        return z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)  # [batch_size, n_ctx, d_model]
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        if self.legacy:
            x = x[self.layer]
            return self.model.ln_final(x)
        o = x["last"]
        o = self.model.ln_final(o)
        x["pooled"] = self.pool(o, text)
        return x

    def pool(self, x, text):
        # take features from the eot embedding (eot_token is the highest number in each sequence)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        outputs = {}
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)  # LND -> NLD
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)  # LND -> NLD
        return outputs


def tokenize(texts, context_length=77):
    """open_clip.tokenize: [sot] + bpe + [eot], cut to context_length (eot kept last), padded with 0."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    sot, eot = tok.bos_token_id, tok.eos_token_id
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot] + tok(text, add_special_tokens=False)["input_ids"] + [eot]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """embeds each dimension independently and concatenates them: (b, d) -> (b, d * outdim)"""

    def __init__(self, outdim):
        super().__init__()
        self.timestep = Timestep(outdim)
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        assert len(x.shape) == 2
        b, dims = x.shape[0], x.shape[1]
        emb = self.timestep(x.reshape(b * dims))
        return emb.reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict, force_zero_embeddings=None) -> dict:
        output = dict()
        if force_zero_embeddings is None:
            force_zero_embeddings = []
        for embedder in self.embedders:
            embedding_context = nullcontext if embedder.is_trainable else torch.no_grad
            with embedding_context():
                if hasattr(embedder, "input_key") and (embedder.input_key is not None):
                    if embedder.legacy_ucg_val is not None:
                        raise NotImplementedError("harness: legacy_ucg_val is not simulated")
                    emb_out = embedder(batch[embedder.input_key])
                elif hasattr(embedder, "input_keys"):
                    emb_out = embedder(*[batch[k] for k in embedder.input_keys])
            assert isinstance(emb_out, (torch.Tensor, list, tuple)), f"encoder outputs must be tensors or a sequence, but got {type(emb_out)}"
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0 and embedder.legacy_ucg_val is None:
                    emb = torch.bernoulli((1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device)).reshape(
                        (-1,) + (1,) * (emb.dim() - 1)) * emb
                if hasattr(embedder, "input_key") and embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output


# --------------------------------------------------------------------------- DiffusionEngine


class DiffusionEngine(nn.Module):
    """sgm.models.diffusion.DiffusionEngine (inference parts)."""

    def __init__(self, unet: UNetModel, conditioner: GeneralConditioner, first_stage_model, scale_factor=0.13025, scaling=None):
        super().__init__()
        self.input_key = "jpg"
        self.model = OpenAIWrapper(unet)
        self.denoiser = Denoiser(scaling or EpsScaling())
        self.conditioner = conditioner
        self.first_stage_model = first_stage_model
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = False
        self.use_ema = False

    @torch.no_grad()
    def decode_first_stage(self, z):
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        z = self.first_stage_model.encode(x)
        return self.scale_factor * z

    def ema_scope(self, context=None):
        return nullcontext()


def build_tiny_sdxl(seed: int = 0) -> DiffusionEngine:
    """UNet + GeneralConditioner [CLIP-L-like, OpenCLIP-bigG-like, 3 x ConcatTimestepEmbedderND(8)] + first stage.

    The embedders are the raw sgm ones (``is_trainable False``, ``input_key`` set as the SDXL config
    does); the WebUI stand-in wraps the text ones the way sd_hijack does."""
    te1_width, te2_width, pooled, outdim = 32, 48, 40, 8
    torch.manual_seed(seed)
    unet = UNetModel(context_dim=te1_width + te2_width, adm_in_channels=pooled + 3 * 2 * outdim)
    clip_l = FrozenCLIPEmbedder(width=te1_width, layers=3, heads=2, seed=seed + 1, layer="hidden")
    clip_g = FrozenOpenCLIPEmbedder2(width=te2_width, layers=2, heads=2, embed_dim=pooled, seed=seed + 2)
    embedders = [clip_l, clip_g] + [ConcatTimestepEmbedderND(outdim) for _ in range(3)]
    for embedder, key in zip(embedders, ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]):
        embedder.is_trainable = False
        embedder.ucg_rate = 0.0
        embedder.input_key = key
    model = DiffusionEngine(unet, GeneralConditioner(embedders), _ldm.TinyFirstStage(seed=seed))
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------- attention optimizations


def apply_sdp_optimization():
    """A1111's SdOptimizationSdp.apply also sets ``sgm.modules.attention.CrossAttention.forward``."""
    CrossAttention.forward = _ldm.scaled_dot_product_attention_forward


def undo_optimizations():
    CrossAttention.forward = _original_forward


def optimization_applied() -> bool:
    return CrossAttention.forward is not _original_forward
