"""Attention dispatch: every attention in minidb (UNet, text encoder, VAE) calls `attention()`.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D) -> out (B, H, Lq, D).
B batch, H heads, Lq query tokens (pixels of a feature map, or text tokens), Lk key tokens
(the same pixels for self-attention, the 77 text tokens for cross-attention), D head dim.

There is one computation, softmax(q kᵀ / √D) v, with several implementations:
- "math": the plain PyTorch formula below. It is the oracle in tests and the easiest to read.
- "sdpa": torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel
  (flash / memory-efficient) when one applies.
- "triton": minidb/flash_attention.py, our own fused FlashAttention kernel, forward and backward.
  It has no causal mask and handles head dims up to 256, so the text encoder's causal attention
  and the VAE's single 512-wide head always go to SDPA; the UNet's attention goes to the kernel.
"auto" (the default) would use the Triton kernel where it applies (a CUDA tensor in fp16 or bf16,
triton installed) and SDPA everywhere else, and warn once and go on with SDPA should the kernel fail
to compile or launch on some GPU. It does so only while KERNEL_IS_FASTER: measured on an H200
(bench/RESULTS.md, 2026-11-26), the kernel is correct but slower than SDPA's flash backend at every
SD shape, so today "auto" is SDPA and the kernel runs only when asked for.

Set MINIDB_ATTENTION=math, sdpa or triton to force a backend, e.g. to compare or bisect a bug.
"triton" also runs on the CPU under TRITON_INTERPRET=1 (slowly; that is how the tests check it).
"""

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "triton")
KERNEL_MAX_HEAD_DIM = 256  # flash_attention.MAX_HEAD_DIM, not imported: importing it imports triton
_kernel_failed = []  # "auto" stops using the kernel after it fails once (forced "triton" raises instead)


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


def _has_triton():
    return importlib.util.find_spec("triton") is not None


KERNEL_IS_FASTER = False  # H200, 2026-11-26: forward 0.12x-0.85x, forward+backward 0.24x-0.96x SDPA-flash


def _auto_picks_kernel(q):
    return KERNEL_IS_FASTER and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_triton() and not _kernel_failed


def attention(q, k, v, causal=False, upcast=False):
    """softmax(q kᵀ / √D) v over the last two dims; `causal` masks future tokens.

    `upcast` computes in float32 even for half-precision inputs. SD 2.1 was trained that way
    ("upcast_attention" in its config; ATTN_PRECISION="fp32" in Stability's code) because its
    fp16 attention scores can overflow. The Triton kernel needs no upcast: it computes the scores,
    the softmax and both products' sums in fp32 whatever the input dtype, so nothing overflows;
    only the probabilities (in [0, 1]) are rounded to fp16/bf16 before P·v, as FlashAttention does.
    """
    backend = _backend()
    if backend == "math":
        return attention_math(q, k, v, causal)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for tests
    if backend == "triton" and not (_has_triton() and (q.is_cuda or interpreted)):
        raise RuntimeError("MINIDB_ATTENTION=triton needs the triton package and a CUDA GPU "
                           "(or TRITON_INTERPRET=1 to run the kernel slowly on the CPU, for tests).")
    kernel_fits = not causal and q.shape[-1] <= KERNEL_MAX_HEAD_DIM
    if kernel_fits and (backend == "triton" or (backend == "auto" and _auto_picks_kernel(q))):
        from minidb.flash_attention import flash_attention  # imported here: triton is optional

        if backend == "triton":
            return flash_attention(q, k, v)
        try:
            return flash_attention(q, k, v)
        except Exception as e:  # e.g. a GPU with too little shared memory for the kernel's tiles
            _kernel_failed.append(e)
            warnings.warn(f"the Triton attention kernel failed on this GPU ({type(e).__name__}: "
                          f"{str(e)[:200]}); using PyTorch's SDPA from now on.")
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return attention_sdpa(q.float(), k.float(), v.float(), causal).to(q.dtype)
    return attention_sdpa(q, k, v, causal)
