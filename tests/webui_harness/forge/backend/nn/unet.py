"""backend.nn.unet: IntegratedUNet2DConditionModel with Forge's module tree and patch points.

Written for the harness (not copied), following Forge's layout and behaviour:

- ``input_blocks`` / ``middle_block`` / ``output_blocks`` of ``TimestepEmbedSequential``;
  ``SpatialTransformer`` -> ``transformer_blocks.N`` (``BasicTransformerBlock``) with ``attn1`` /
  ``attn2`` (``CrossAttention``: ``heads``, ``dim_head``, ``to_q``, ``to_k``, ``to_v``, ``to_out``;
  no ``scale`` attribute) and ``norm1..3`` / ``ff``.
- ``forward(x, timesteps, context, y, control, transformer_options)`` writes
  ``original_shape``, ``transformer_index`` (0.. over the whole UNet), ``block`` (("input", i),
  ("middle", 0), ("output", i)), ``block_index``; block/patch hooks: ``block_modifiers``,
  ``block_inner_modifiers``, ``input_block_patch``, ``input_block_patch_after_skip``,
  ``output_block_patch``, ``group_norm_wrapper``.
- ``BasicTransformerBlock._forward`` builds ``extra_options`` (every transformer_options key
  except ``patches`` / ``patches_replace``, plus ``n_heads`` and ``dim_head``), runs
  ``attn1_patch`` / ``attn2_patch`` (``fn(n, context, value, extra_options)``), looks up
  ``patches_replace["attn1"|"attn2"]`` by ``(block_name, number, block_index)`` then
  ``(block_name, number)`` and calls ``fn(q, k, v, extra_options)`` on the projected tensors,
  then ``attn*_output_patch``; residuals are added IN PLACE (``x += n``) as in Forge, so a
  backward pass through a block fails on inference tensors / version counters.
- SDXL (Forge's backend/nn/unet.py): ``num_classes="sequential"`` with ``adm_in_channels`` builds
  ``label_emb = Sequential(Sequential(Linear(adm, 4*mc), SiLU, Linear(4*mc, 4*mc)))`` right after
  ``time_embed``; ``forward`` asserts ``(y is not None) == (num_classes is not None)`` and adds
  ``label_emb(y)`` to the time embedding. ``Timestep(dim)`` is the sinusoidal embedder sdxl.py
  uses for the six size/crop ids.
"""
import math

import torch
from torch import nn

from backend.attention import attention_function


class FrozenConfig(dict):
    """What diffusers' ConfigMixin exposes as ``.config``: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)


def exists(val):
    return val is not None


def default(val, d):
    return val if exists(val) else d


def checkpoint(f, args, parameters, enable=False):
    if enable:
        raise NotImplementedError('Gradient Checkpointing is not implemented.')
    return f(*args)


def conv_nd(dims, *args, **kwargs):
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def apply_control(h, control, name):
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h += ctrl
    return h


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        modifiers = transformer_options.get("block_inner_modifiers", [])
        for layer_index, layer in enumerate(self):
            for modifier in modifiers:
                x = modifier(x, 'before', layer, layer_index, self, transformer_options)
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                if "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
            for modifier in modifiers:
                x = modifier(x, 'after', layer, layer_index, self, transformer_options)
        return x


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=False, dropout=0.):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        q = self.to_q(x)
        context = default(context, x)
        k = self.to_k(context)
        v = self.to_v(value) if value is not None else self.to_v(context)
        out = attention_function(q, k, v, self.heads, mask)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0., context_dim=None, gated_ff=True, checkpoint=True, ff_in=False,
                 inner_dim=None, disable_self_attn=False):
        super().__init__()
        self.ff_in = ff_in or inner_dim is not None
        if inner_dim is None:
            inner_dim = dim
        self.is_res = inner_dim == dim
        if self.ff_in:
            self.norm_in = nn.LayerNorm(dim)
            self.ff_in = FeedForward(dim, dim_out=inner_dim, dropout=dropout, glu=gated_ff)
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=inner_dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if self.disable_self_attn else None)
        self.norm1 = nn.LayerNorm(inner_dim)
        self.attn2 = CrossAttention(query_dim=inner_dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(inner_dim)
        self.ff = FeedForward(inner_dim, dim_out=dim, dropout=dropout, glu=gated_ff)
        self.norm3 = nn.LayerNorm(inner_dim)
        self.checkpoint = checkpoint
        self.n_heads = n_heads
        self.d_head = d_head

    def forward(self, x, context=None, transformer_options={}):
        return checkpoint(self._forward, (x, context, transformer_options), None, self.checkpoint)

    @staticmethod
    def _replace_for(replace_patches, name, block, transformer_block):
        table = replace_patches.get(name, {})
        key = transformer_block if transformer_block in table else block
        return table.get(key) if key is not None else None

    def _forward(self, x, context=None, transformer_options={}):
        patches = transformer_options.get("patches", {})
        patches_replace = transformer_options.get("patches_replace", {})
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options["n_heads"] = self.n_heads
        extra_options["dim_head"] = self.d_head
        block = transformer_options.get("block", None)
        block_index = transformer_options.get("block_index", 0)
        transformer_block = (block[0], block[1], block_index) if block is not None else None

        if self.ff_in:
            x_skip = x
            x = self.ff_in(self.norm_in(x))
            if self.is_res:
                x += x_skip

        # self-attention
        n = self.norm1(x)
        context_attn1 = context if self.disable_self_attn else None
        value_attn1 = None
        if "attn1_patch" in patches:
            if context_attn1 is None:
                context_attn1 = n
            value_attn1 = context_attn1
            for p in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra_options)
        replace = self._replace_for(patches_replace, "attn1", block, transformer_block)
        if replace is not None:
            if context_attn1 is None:
                context_attn1 = n
                value_attn1 = n
            n = self.attn1.to_q(n)
            context_attn1 = self.attn1.to_k(context_attn1)
            value_attn1 = self.attn1.to_v(value_attn1)
            n = replace(n, context_attn1, value_attn1, extra_options)
            n = self.attn1.to_out(n)
        else:
            n = self.attn1(n, context=context_attn1, value=value_attn1, transformer_options=extra_options)
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra_options)
        x += n  # in place, as in Forge
        for p in patches.get("middle_patch", []):
            x = p(x, extra_options)

        # cross-attention
        if self.attn2 is not None:
            n = self.norm2(x)
            context_attn2 = context
            value_attn2 = None
            if "attn2_patch" in patches:
                value_attn2 = context_attn2
                for p in patches["attn2_patch"]:
                    n, context_attn2, value_attn2 = p(n, context_attn2, value_attn2, extra_options)
            replace = self._replace_for(patches_replace, "attn2", block, transformer_block)
            if replace is not None:
                if value_attn2 is None:
                    value_attn2 = context_attn2
                n = self.attn2.to_q(n)
                context_attn2 = self.attn2.to_k(context_attn2)
                value_attn2 = self.attn2.to_v(value_attn2)
                n = replace(n, context_attn2, value_attn2, extra_options)
                n = self.attn2.to_out(n)
            else:
                n = self.attn2(n, context=context_attn2, value=value_attn2, transformer_options=extra_options)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra_options)
        x += n  # in place, as in Forge

        x_skip = x if self.is_res else 0
        x = self.ff(self.norm3(x))
        if self.is_res:
            x += x_skip  # in place, as in Forge
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0., context_dim=None, disable_self_attn=False,
                 use_linear=False, use_checkpoint=True):
        super().__init__()
        if exists(context_dim) and not isinstance(context_dim, list):
            context_dim = [context_dim] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        if use_linear:
            self.proj_out = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)
        self.use_linear = use_linear

    def forward(self, x, context=None, transformer_options={}):
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()  # b c h w -> b (h w) c
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            x = block(x, context=context[i], transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # b (h w) c -> b c h w
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x, output_shape=None):
        shape = [x.shape[2] * 2, x.shape[3] * 2]
        if output_shape is not None:
            shape = [output_shape[2], output_shape[3]]
        x = torch.nn.functional.interpolate(x, size=shape, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False, use_scale_shift_norm=False,
                 dims=2, use_checkpoint=False, up=False, down=False, kernel_size=3, exchange_temb_dims=False, skip_t_emb=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.exchange_temb_dims = exchange_temb_dims
        padding = kernel_size // 2
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding))
        self.updown = False
        self.h_upd = self.x_upd = nn.Identity()
        self.skip_t_emb = skip_t_emb
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        conv_nd(dims, self.out_channels, self.out_channels, kernel_size, padding=padding))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb, transformer_options={}):
        return checkpoint(self._forward, (x, emb, transformer_options), None, self.use_checkpoint)

    def _forward(self, x, emb, transformer_options={}):
        wrapper = transformer_options.get("group_norm_wrapper", None)
        if wrapper is not None:
            h = self.in_layers[1:](wrapper(self.in_layers[0], x, transformer_options))
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        h = h + emb_out
        if wrapper is not None:
            h = self.out_layers[1:](wrapper(self.out_layers[0], h, transformer_options))
        else:
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class IntegratedUNet2DConditionModel(nn.Module):
    config_name = 'config.json'

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, dropout=0, channel_mult=(1, 2, 4, 8),
                 conv_resample=True, dims=2, num_classes=None, use_checkpoint=False, num_heads=-1, num_head_channels=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_spatial_transformer=False, transformer_depth=1,
                 context_dim=None, disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
                 use_linear_in_transformer=False, adm_in_channels=None, transformer_depth_middle=None, transformer_depth_output=None):
        super().__init__()
        self.config = FrozenConfig(
            in_channels=in_channels, model_channels=model_channels, out_channels=out_channels, num_res_blocks=num_res_blocks,
            dropout=dropout, channel_mult=list(channel_mult), conv_resample=conv_resample, dims=dims, num_classes=num_classes,
            use_checkpoint=use_checkpoint, num_heads=num_heads, num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, use_spatial_transformer=use_spatial_transformer,
            transformer_depth=list(transformer_depth), context_dim=context_dim, disable_self_attentions=disable_self_attentions,
            num_attention_blocks=num_attention_blocks, disable_middle_self_attn=disable_middle_self_attn,
            use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels,
            transformer_depth_middle=transformer_depth_middle, transformer_depth_output=list(transformer_depth_output))
        assert num_classes in (None, "sequential"), "the harness builds SD1 (no ADM) and SDXL (sequential ADM) only"
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = len(channel_mult) * [num_res_blocks] if isinstance(num_res_blocks, int) else num_res_blocks
        transformer_depth = list(transformer_depth)
        transformer_depth_output = list(transformer_depth_output)
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if self.num_classes == "sequential":
            assert adm_in_channels is not None
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                                         nn.Linear(time_embed_dim, time_embed_dim)))

        def heads_for(ch):
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def transformer(ch, depth):
            n_heads, d_head = heads_for(ch)
            return SpatialTransformer(ch, n_heads, d_head, depth=depth, context_dim=context_dim, use_checkpoint=use_checkpoint,
                                      use_linear=use_linear_in_transformer)

        def resblock(ch, out_ch=None):
            return ResBlock(channels=ch, emb_channels=time_embed_dim, dropout=dropout, out_channels=out_ch, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                depth = transformer_depth.pop(0)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims, out_channels=ch)))
                input_block_chans.append(ch)

        mid = [resblock(ch)]
        if transformer_depth_middle >= 0:
            mid += [transformer(ch, transformer_depth_middle), resblock(ch)]
        self.middle_block = TimestepEmbedSequential(*mid)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                depth = transformer_depth_output.pop()
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        transformer_patches = transformer_options.get("patches", {})
        block_modifiers = transformer_options.get("block_modifiers", [])
        assert (y is not None) == (self.num_classes is not None)
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)
        h = x
        for id, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", id)
            for m in block_modifiers:
                h = m(h, 'before', transformer_options)
            h = module(h, emb, context, transformer_options)
            h = apply_control(h, control, 'input')
            for m in block_modifiers:
                h = m(h, 'after', transformer_options)
            for p in transformer_patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
            for p in transformer_patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        for m in block_modifiers:
            h = m(h, 'before', transformer_options)
        h = self.middle_block(h, emb, context, transformer_options)
        h = apply_control(h, control, 'middle')
        for m in block_modifiers:
            h = m(h, 'after', transformer_options)
        for id, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", id)
            hsp = hs.pop()
            hsp = apply_control(hsp, control, 'output')
            for p in transformer_patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            del hsp
            output_shape = hs[-1].shape if len(hs) > 0 else None
            for m in block_modifiers:
                h = m(h, 'before', transformer_options)
            h = module(h, emb, context, transformer_options, output_shape)
            for m in block_modifiers:
                h = m(h, 'after', transformer_options)
        transformer_options["block"] = ("last", 0)
        for m in block_modifiers:
            h = m(h, 'before', transformer_options)
        if "group_norm_wrapper" in transformer_options:
            h = self.out[1:](transformer_options["group_norm_wrapper"](self.out[0], h, transformer_options))
        else:
            h = self.out(h)
        for m in block_modifiers:
            h = m(h, 'after', transformer_options)
        return h.type(x.dtype)
