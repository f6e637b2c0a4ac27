"""backend.attention: ``attention_function(q, k, v, heads, mask=None)`` on projected (B, N, heads*dim_head) tensors.

On CPU Forge picks ``attention_pytorch`` (scaled_dot_product_attention): attention probabilities
are never materialised.
"""
import torch


def get_attn_precision(attn_precision=torch.float32):
    return None


def attention_basic(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    scale = dim_head ** -0.5
    sim = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        sim = sim + mask
    out = sim.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


attention_function = attention_pytorch
attention_xformers = None
