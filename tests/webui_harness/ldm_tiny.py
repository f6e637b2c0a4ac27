"""A tiny SD1-architecture latent diffusion model in ldm (CompVis) naming, without diffusers.

Layout follows Stability-AI/stablediffusion ``ldm/modules/diffusionmodules/openaimodel.py`` and
``ldm/modules/attention.py`` with the SD1 config (attention_resolutions [4, 2, 1],
num_res_blocks 2, channel_mult of 4 levels, transformer_depth 1, conv proj_in/proj_out, GEGLU
feed-forward), so module paths are the real ones::

    input_blocks.0.0                       conv_in
    input_blocks.{1,2,4,5,7,8}.0           ResBlock (in_layers / emb_layers / out_layers / skip_connection)
    input_blocks.{1,2,4,5,7,8}.1           SpatialTransformer (norm, proj_in, transformer_blocks.0, proj_out)
    input_blocks.{3,6,9}.0.op              Downsample
    input_blocks.{10,11}.0                 ResBlock
    middle_block.{0,2} ResBlock, middle_block.1 SpatialTransformer
    output_blocks.0..11  (3 per level; attention on 3..11; Upsample at 2.1, 5.2, 8.2 ``.conv``)
    time_embed.{0,2}, out.{0,2}

Widths are tiny: model_channels 32, channel_mult (1, 2, 2, 2) -> 32/64/64/64, 2 heads,
context_dim 32; weights are random (seeded), and unlike ldm the zero-initialised layers
(``proj_out``, ``out_layers.3``, ``out.2``) get random weights too so every layer matters.

The first stage is NOT a VAE: ``TinyFirstStage.decode`` is a fixed 1x1 conv (4 -> 3 channels)
followed by nearest x8 upsampling and tanh, enough to give images whose pixels depend on the
latent. ``encode`` is its rough inverse (average-pool /8 and a fixed 3 -> 4 1x1 conv).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

TOKENIZER_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "lib_loraclr", "assets", "clip_tokenizer"))


def default(val, d):
    return val if val is not None else d


# ----------------------------------------------------------------------------------- attention


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()) if not glu else GEGLU(dim, inner_dim)
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention: softmax(QK^T * scale) V, heads folded into the batch."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)

        self.scale = dim_head ** -0.5
        self.heads = heads

        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)

        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        h = self.heads

        q = self.to_q(x)
        context = default(context, x)
        k = self.to_k(context)
        v = self.to_v(context)

        def split(t):  # 'b n (h d) -> (b h) n d'
            b, n, _ = t.shape
            return t.reshape(b, n, h, -1).permute(0, 2, 1, 3).reshape(b * h, n, -1)

        q, k, v = map(split, (q, k, v))

        sim = torch.einsum('b i d, b j d -> b i j', q, k) * self.scale
        del q, k

        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            max_neg_value = -torch.finfo(sim.dtype).max
            mask = mask[:, None, :].repeat_interleave(h, dim=0)
            sim.masked_fill_(~mask, max_neg_value)

        sim = sim.softmax(dim=-1)

        out = torch.einsum('b i j, b j d -> b i d', sim, v)
        bh, n, d = out.shape  # '(b h) n d -> b n (h d)'
        out = out.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True, disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if self.disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return self._forward(x, context)

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class SpatialTransformer(nn.Module):
    """SD1 flavour: GroupNorm, 1x1 conv proj_in / proj_out (use_linear=False)."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, disable_self_attn=False, use_linear=False, use_checkpoint=True):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, list):
            context_dim = [context_dim]
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d], disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)
        ])
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)  # zero_module() in ldm
        self.use_linear = use_linear

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()  # 'b c h w -> b (h w) c'
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[i])
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # 'b (h w) c -> b c h w'
        x = self.proj_out(x)
        return x + x_in


# -------------------------------------------------------------------------------------- unet


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    def forward(self, x, emb):
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False, use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.out_channels = out_channels or channels
        self.in_layers = nn.Sequential(Normalize(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = False
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(Normalize(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))  # zero_module() in ldm
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        h = h + emb_out
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, attention_resolutions=(4, 2, 1),
                 channel_mult=(1, 2, 2, 2), num_heads=2, context_dim=32, transformer_depth=1, dropout=0.0):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_heads = num_heads
        self.dtype = torch.float32
        self.predict_codebook_ids = False

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))

        def transformer(ch, level):
            return SpatialTransformer(ch, num_heads, ch // num_heads, depth=transformer_depth, context_dim=context_dim)

        build_unet_blocks(self, in_channels, out_channels, time_embed_dim, dropout, transformer)

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        h = run_unet_blocks(self, x.type(self.dtype), emb, context)
        h = h.type(x.dtype)
        return self.out(h)


def build_unet_blocks(unet, in_channels, out_channels, time_embed_dim, dropout, transformer, *,
                      blocks=None, normalize=None):
    """The openaimodel block layout both ldm's and sgm's UNetModel build (their __init__ bodies
    are the same loops): input / middle / output blocks and ``out`` on ``unet``, which carries
    model_channels, num_res_blocks, attention_resolutions and channel_mult. ``transformer(ch,
    level)`` makes a level's SpatialTransformer (level "middle" for the middle block);
    ``blocks``: (TimestepEmbedSequential, ResBlock, Downsample, Upsample) of the codebase."""
    sequential, resblock, downsample, upsample = blocks or (TimestepEmbedSequential, ResBlock, Downsample, Upsample)
    model_channels, num_res_blocks = unet.model_channels, unet.num_res_blocks
    attention_resolutions, channel_mult = unet.attention_resolutions, unet.channel_mult
    unet.input_blocks = nn.ModuleList([sequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
    input_block_chans = [model_channels]
    ch = model_channels
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [resblock(ch, time_embed_dim, dropout, out_channels=mult * model_channels)]
            ch = mult * model_channels
            if ds in attention_resolutions:
                layers.append(transformer(ch, level))
            unet.input_blocks.append(sequential(*layers))
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            unet.input_blocks.append(sequential(downsample(ch, True, out_channels=ch)))
            input_block_chans.append(ch)
            ds *= 2

    unet.middle_block = sequential(
        resblock(ch, time_embed_dim, dropout),
        transformer(ch, "middle"),
        resblock(ch, time_embed_dim, dropout),
    )

    unet.output_blocks = nn.ModuleList([])
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            ich = input_block_chans.pop()
            layers = [resblock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult)]
            ch = model_channels * mult
            if ds in attention_resolutions:
                layers.append(transformer(ch, level))
            if level and i == num_res_blocks:
                layers.append(upsample(ch, True, out_channels=ch))
                ds //= 2
            unet.output_blocks.append(sequential(*layers))

    unet.out = nn.Sequential((normalize or Normalize)(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))


def run_unet_blocks(unet, h, emb, context):
    """Input blocks (keeping each output for the skips), middle block, output blocks."""
    hs = []
    for module in unet.input_blocks:
        h = module(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    for module in unet.output_blocks:
        h = torch.cat([h, hs.pop()], dim=1)
        h = module(h, emb, context)
    return h


class DiffusionWrapper(nn.Module):
    """ldm.models.diffusion.ddpm.DiffusionWrapper (crossattn only)."""

    def __init__(self, diffusion_model, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: list = None, c_crossattn: list = None, c_adm=None):
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "crossattn":
            cc = torch.cat(c_crossattn, 1)
            return self.diffusion_model(x, t, context=cc)
        raise NotImplementedError(self.conditioning_key)


# ------------------------------------------------------------------------------ text encoder


def _make_clip_text_model(width=32, layers=2, heads=2, seed=0):
    """A tiny transformers CLIPTextModel whose named_modules() use the transformers-4 layout
    (``text_model.encoder.layers.N...``) in both transformers 4.30 and 5.x.

    transformers 4.x: the real ``CLIPTextModel`` (it has a ``text_model`` child).
    transformers 5.x: ``CLIPTextModel`` dropped the ``text_model`` child, so it is wrapped in
    ``CLIPTextModelTF4Layout`` whose ``text_model`` is the 5.x model: module names then match
    what A1111 (pinned to transformers 4.30) sees.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    # Fresh LayerNorms (weight 1, bias 0) make the encoder output mean ~0, and A1111's "Original"
    # emphasis divides by that mean: give them seeded non-trivial affine parameters.
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 + 0.1 * torch.randn(module.bias.shape, generator=g))
    if not hasattr(model, "text_model"):
        model = CLIPTextModelTF4Layout(model)
    model.eval()
    return model


class CLIPTextModelTF4Layout(nn.Module):
    """transformers-5 CLIPTextModel presented with the transformers-4 module tree."""

    def __init__(self, inner):
        super().__init__()
        self.text_model = inner
        self.config = inner.config

    def forward(self, input_ids=None, output_hidden_states=None, **kwargs):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states, **kwargs)


class FrozenCLIPEmbedder(nn.Module):
    """ldm.modules.encoders.modules.FrozenCLIPEmbedder: ``.tokenizer`` + ``.transformer``."""

    def __init__(self, tokenizer_dir=TOKENIZER_DIR, width=32, layers=2, heads=2, seed=0):
        super().__init__()
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.transformer = _make_clip_text_model(width, layers, heads, seed)
        self.max_length = 77
        self.layer = "last"
        self.layer_idx = None

    def forward(self, text):
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        outputs = self.transformer(input_ids=batch_encoding["input_ids"])
        return outputs.last_hidden_state

    def encode(self, text):
        return self(text)


# ------------------------------------------------------------------------------- first stage


class TinyFirstStage(nn.Module):
    """Stand-in for the VAE: decode = tanh(upsample_x8(conv1x1(z / scale))). Not trainable."""

    def __init__(self, latent_channels=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 1234)
        self.decoder_conv = nn.Conv2d(latent_channels, 3, 1)
        self.encoder_conv = nn.Conv2d(3, latent_channels, 1)
        with torch.no_grad():
            self.decoder_conv.weight.copy_(torch.randn(self.decoder_conv.weight.shape, generator=g) * 0.5)
            self.decoder_conv.bias.zero_()
            self.encoder_conv.weight.copy_(torch.randn(self.encoder_conv.weight.shape, generator=g) * 0.5)
            self.encoder_conv.bias.zero_()
        self.requires_grad_(False)

    @property
    def dtype(self):
        return self.decoder_conv.weight.dtype

    def decode(self, z):
        return torch.tanh(F.interpolate(self.decoder_conv(z), scale_factor=8, mode="nearest"))

    def encode(self, x):
        return self.encoder_conv(F.avg_pool2d(x, 8))


# ---------------------------------------------------------------------------- LatentDiffusion


def make_sd1_alphas_cumprod(timesteps=1000, linear_start=0.00085, linear_end=0.012):
    """SD's "scaled_linear" betas (ldm make_beta_schedule('linear', ...) squares a linspace of sqrt)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    return torch.cumprod(alphas, dim=0).to(torch.float32)


class LatentDiffusion(nn.Module):
    """The parts of ldm's LatentDiffusion (plus A1111's additions) that the WebUI code paths read."""

    parameterization = "eps"
    cond_stage_key = "txt"
    latent_channels = 4
    is_sdxl = False
    is_sdxl_inpaint = False
    is_sd1 = True
    is_sd2 = False
    is_sd3 = False
    is_ssd = False

    def __init__(self, unet: UNetModel, cond_stage_model: nn.Module, first_stage_model: TinyFirstStage, scale_factor=0.18215):
        super().__init__()
        self.model = DiffusionWrapper(unet, "crossattn")
        self.cond_stage_model = cond_stage_model
        self.first_stage_model = first_stage_model
        self.scale_factor = scale_factor
        self.num_timesteps = 1000
        self.register_buffer("alphas_cumprod", make_sd1_alphas_cumprod())
        self.alphas_cumprod_original = self.alphas_cumprod
        self.cond_stage_forward = None
        self.sd_checkpoint_info = None
        self.sd_model_hash = None
        self.sd_model_checkpoint = None
        self.cond_stage_model_empty_prompt = None

    @contextmanager
    def ema_scope(self, context=None):
        yield None

    def get_learned_conditioning(self, c):
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            return self.cond_stage_model.encode(c)
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior


def build_tiny_sd1(seed: int = 0, tokenizer_dir: str = TOKENIZER_DIR, context_dim: int = 32) -> LatentDiffusion:
    """UNet + tiny CLIP (raw ``FrozenCLIPEmbedder``; the WebUI stand-in wraps it the way sd_hijack does)."""
    torch.manual_seed(seed)
    unet = UNetModel(context_dim=context_dim)
    clip = FrozenCLIPEmbedder(tokenizer_dir, width=context_dim, seed=seed + 1)
    model = LatentDiffusion(unet, clip, TinyFirstStage(seed=seed))
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------- attention optimizations

_original_forward = CrossAttention.forward


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    """What A1111's sd_hijack_optimizations puts on CrossAttention.forward for "sdp"."""
    batch_size, sequence_length, inner_dim = x.shape
    h = self.heads
    q_in = self.to_q(x)
    context = default(context, x)
    k_in = self.to_k(context)
    v_in = self.to_v(context)
    head_dim = q_in.shape[-1] // h
    q = q_in.view(batch_size, -1, h, head_dim).transpose(1, 2)
    k = k_in.view(k_in.shape[0], -1, h, head_dim).transpose(1, 2)
    v = v_in.view(v_in.shape[0], -1, h, head_dim).transpose(1, 2)
    if mask is not None:
        mask = mask.view(batch_size, 1, 1, -1)
    hidden_states = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, h * head_dim).to(q.dtype)
    hidden_states = self.to_out[0](hidden_states)
    hidden_states = self.to_out[1](hidden_states)
    return hidden_states


def apply_sdp_optimization():
    """Replace ``CrossAttention.forward`` at class level, as A1111 does when a model loads."""
    CrossAttention.forward = scaled_dot_product_attention_forward


def undo_optimizations():
    CrossAttention.forward = _original_forward


def optimization_applied() -> bool:
    return CrossAttention.forward is not _original_forward
