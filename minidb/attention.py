"""Attention dispatch: every attention in minidb (UNet, text encoder, VAE) calls `attention()`.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D) -> out (B, H, Lq, D).
B batch, H heads, Lq query tokens (pixels of a feature map, or text tokens), Lk key tokens
(the same pixels for self-attention, the 77 text tokens for cross-attention), D head dim.

There is one computation, softmax(q kᵀ / √D) v, with several implementations:
- "math": the plain PyTorch formula below. It is the oracle in tests and the easiest to read.
- "sdpa": torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel
  (flash / memory-efficient) when one applies. This is the default.
Faster backends (a Triton kernel for the GPU) plug in here, so the models never change.

Set MINIDB_ATTENTION=math (or sdpa) to force a backend, e.g. to compare or bisect a bug.
"""

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math")


def attention_math(q, k, v, causal=False):
    """Reference attention, computed in float32 whatever the input dtype."""
    scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if causal:  # token i may only look at tokens 0..i (CLIP's text encoder)
        lq, lk = scores.shape[-2:]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention_sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _backend():
    name = os.environ.get("MINIDB_ATTENTION", "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"MINIDB_ATTENTION={name!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    return name


def attention(q, k, v, causal=False, upcast=False):
    """softmax(q kᵀ / √D) v over the last two dims; `causal` masks future tokens.

    `upcast` computes in float32 even for half-precision inputs. SD 2.1 was trained that way
    ("upcast_attention" in its config; ATTN_PRECISION="fp32" in Stability's code) because its
    fp16 attention scores can overflow.
    """
    backend = _backend()
    if backend == "math":
        return attention_math(q, k, v, causal)
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return attention_sdpa(q.float(), k.float(), v.float(), causal).to(q.dtype)
    return attention_sdpa(q, k, v, causal)
