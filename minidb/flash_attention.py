"""Fused attention for the GPU: a FlashAttention kernel in Triton, forward and backward.

It computes softmax(q kᵀ / √D) v, like `minidb.attention.attention_math`, without ever storing the
(Lq, Lk) matrix of scores: FlashAttention (Dao et al. 2022, arXiv 2205.14135) with the loop order of
FlashAttention-2 (Dao 2023, arXiv 2307.08691). At the UNet's first level that matrix would be
4096 x 4096 per head; here each program keeps one tile of it in registers and moves on.

Legend: B batch, H heads, Lq query rows, Lk key rows, D head dim. A program works on one (batch, head)
and one tile: BLOCK_M query rows or BLOCK_N key rows. BLOCK_D is D padded to a power of two.

Forward, for one block of query rows (the "online softmax"). A softmax needs the maximum and the sum
of a whole row, but the keys arrive one block at a time. So keep, per row,
    m    the largest score seen so far,
    l    the sum of exp(s - m) over the keys seen so far,
    acc  the sum of exp(s - m) · v over the same keys (the output, not yet divided by l).
When a new block raises the maximum from m to m', everything summed so far was weighted by exp(-m)
instead of exp(-m'): multiply l and acc by α = exp(m - m') and carry on. At the end out = acc / l.
Subtracting the max keeps exp() from overflowing, exactly as in a plain softmax.

Backward recomputes the probabilities instead of storing them. The forward saves one number per
row, the log-sum-exp L = m + log l, and then P = exp(s - L): no max, no sum, one exp per score.
With S = scale · Q Kᵀ, P = softmax(S), O = P V and the incoming gradient dO:
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP - Δ) with Δ = rowsum(P ∘ dP) = rowsum(dO ∘ O),
    dQ = scale · dS K,   dK = scale · dSᵀ Q.
One kernel owns a block of keys and loops over all queries (dK, dV); another owns a block of queries
and loops over all keys (dQ). Each output is written by exactly one program, so no atomics.

Base 2: exp(x) = 2^(x · log2 e). The GPU has a native 2^x instruction (ex2 in PTX, MUFU.EX2 in
SASS); exp() would be that plus the same multiply. So log2(e) is folded into the score scale once,
and the kernels use exp2 and log2 throughout; the saved L is a base-2 log-sum-exp.

Precision: q, k, v in fp16, bf16 or fp32. The products q·k and P·v accumulate in fp32, and the
softmax bookkeeping (m, l, acc) is fp32. For 16-bit inputs P (values in [0, 1]) is rounded to the
input dtype before P·v, as in FlashAttention. fp32 inputs use true fp32 products, not TF32.

Limits: no causal mask (the UNet does not need one; minidb.attention sends causal calls elsewhere)
and D ≤ 256. Any Lq and Lk: the tails of the last blocks are masked.
"""

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # log2(e) = 1/ln 2: exp(x) = exp2(x · log2 e)
MAX_HEAD_DIM = 256

# Head dims 40, 80, 160 (SD 1) are not powers of two, but tl.arange needs a power-of-two extent. We pad
# D to BLOCK_D = 64, 128, 256 with masked loads: the padded columns load as 0, add 0 to every q·k, and
# give output columns that are never stored. Masked lanes fetch no memory, but the matrix units still
# multiply the zeros: 24 of every 64 (37.5%) q·k and P·v FLOPs are wasted at D = 40, likewise at 80, 160.
# Splitting the head dim would waste less (80 = 64 + 16 and 160 = 128 + 32 exactly; 40 = 32 + 8, the 8
# padded to 16 as tl.dot needs K ≥ 16), at the price of two dots per product and less readable code.
# It may matter less than the FLOP count says: each score also costs one exp2, and an H100 computes
# about 256x fewer exponentials per second than fp16 tensor-core FLOPs (FlashAttention-3, Shah et al.
# 2024, arXiv 2407.08608), as much time as the 2·2·64 FLOPs of a padded D = 64 score. Measure first.


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per BLOCK_D, forward and backward. Starting points sized so
# that the fp32 accumulators fit in registers and the pipelined tiles in shared memory; not yet tuned
# on a GPU. (The CPU interpreter ignores warps and stages.)
FWD_TILES = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
BWD_TILES = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 32, 4, 2)}


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqm, skb, skh, skn, H, Lq, Lk, qk_scale, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head) against all Lk keys -> out rows and their L.
    q and o share strides (sq*), k and v share strides (sk*); the head dim is contiguous."""
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    q_base = (bh // H).to(tl.int64) * sqb + (bh % H) * sqh  # this (batch, head) in q and o
    k_base = (bh // H).to(tl.int64) * skb + (bh % H) * skh  # ... and in k and v
    offs_m, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    q_mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]  # rows past Lq, padded columns
    q = tl.load(Q + q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of 2^(s - m_i) v, not yet divided by l_i
    for start_n in range(0, Lk, BLOCK_N):
        n_ok = start_n + offs_n < Lk
        kv_ptrs = k_base + (start_n + offs_n)[:, None] * skn + offs_d[None, :]
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))  # keys past Lk get weight 2^-inf = 0
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has at least one real key
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 the first time)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), in [0, 1]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new

    out = acc / l_i[:, None]  # the softmax's division, once per row at the end
    tl.store(O + q_base + offs_m[:, None] * sqm + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    # L = log2 of sum_j 2^(s_ij), all that backward needs to rebuild P; rows past Lq are not written.
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqh, sqm, skb, skh, skn, H, Lq, Lk, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head); loops over all query blocks -> dk, dv rows.
    q, do share strides (sq*); k, v, dk, dv share strides (sk*).
    For cross-attention (Lk = 77) that is only 2 programs per (batch, head), each looping over all 4096
    queries: little parallelism. Splitting the query loop across programs and summing the partial dk, dv
    would fix it; left for the GPU work to measure."""
    start_n, bh = tl.program_id(0) * BLOCK_N, tl.program_id(1)
    q_base = (bh // H).to(tl.int64) * sqb + (bh % H) * sqh
    k_base = (bh // H).to(tl.int64) * skb + (bh % H) * skh
    offs_m, offs_n, offs_d = tl.arange(0, BLOCK_M), start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    kv_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
    kv_mask = (offs_n < Lk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        m_ok = start_m + offs_m < Lq
        q_ptrs = q_base + (start_m + offs_m)[:, None] * sqm + offs_d[None, :]
        q_mask = m_ok[:, None] & (offs_d < D)[None, :]
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + bh * Lq + start_m + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + bh * Lq + start_m + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        # Transposed tiles (keys along the rows), so that dk and dv come out as (BLOCK_N, BLOCK_D).
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])  # P rebuilt from the saved L: softmax = 2^(s - L)
        # Query rows past Lq need no mask: q = 0 and L = 0 there give P = 1, and their dO and q rows
        # loaded as 0, so they add 0 to dv and dk.
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # dV = Pᵀ dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M): dP = dO Vᵀ
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P ∘ (dP - Δ)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # dK = dSᵀ Q, scaled below

    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)  # keys past Lk: not written
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sqb, sqh, sqm, skb, skh, skn, H, Lq, Lk, qk_scale, sm_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); loops over all key blocks -> dq rows.
    q, do, dq share strides (sq*); k, v share strides (sk*)."""
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    q_base = (bh // H).to(tl.int64) * sqb + (bh % H) * sqh
    k_base = (bh // H).to(tl.int64) * skb + (bh % H) * skh
    offs_m, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    q_ptrs = q_base + offs_m[:, None] * sqm + offs_d[None, :]
    q_mask = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        n_ok = start_n + offs_n < Lk
        kv_ptrs = k_base + (start_n + offs_n)[:, None] * skn + offs_d[None, :]
        kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])  # P rebuilt from the saved L
        # Keys past Lk loaded as 0 and score 0, which can exceed L by more than fp32's exponent range
        # when every real score is very negative: 2^big = inf, and inf · 0 = NaN in dS K. So mask them.
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N): dP = dO Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP - Δ)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ = dS K, scaled below

    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)  # rows past Lq: not written


def _empty_like(x, **kwargs):
    """Output buffers. Tests swap in NaN-filled ones, so that an element no kernel writes shows up."""
    return torch.empty_like(x, **kwargs)


def _same_layout(*xs):
    """The tensors with one common set of strides and a contiguous head dim, so that one set of strides
    addresses them all (copies only when they differ; the UNet's q, k, v views already agree)."""
    if all(x.stride() == xs[0].stride() for x in xs) and xs[0].stride(-1) == 1:
        return xs
    return tuple(x.contiguous() for x in xs)


def _launch_args(q, k, block_m, block_n, backward):
    B, H, Lq, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs every extent >= 16
    bm, bn, warps, stages = (BWD_TILES if backward else FWD_TILES)[block_d]
    # D is a compile-time constant so that the compiler sees the head-dim mask is constant in runs of 8
    # (40 = 5·8) and can still use wide vector loads; one compilation per head dim.
    sizes = dict(D=D, BLOCK_M=block_m or bm, BLOCK_N=block_n or bn, BLOCK_D=block_d,
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # "tf32" is moot for 16-bit inputs
                 num_warps=warps, num_stages=stages)
    strides = (*q.stride()[:3], *k.stride()[:3], H, Lq, k.shape[2])
    return strides, sizes


def _forward(q, k, v, block_m, block_n):
    q, o = _same_layout(q, _empty_like(q))  # o keeps q's strides, so the UNet's rearrange back is free
    k, v = _same_layout(k, v)
    lse = _empty_like(q[..., 0], dtype=torch.float32, memory_format=torch.contiguous_format)  # (B, H, Lq), base 2
    strides, sizes = _launch_args(q, k, block_m, block_n, backward=False)
    grid = (triton.cdiv(q.shape[2], sizes["BLOCK_M"]), q.shape[0] * q.shape[1])
    _fwd_kernel[grid](q, k, v, o, lse, *strides, q.shape[-1] ** -0.5 * LOG2_E, **sizes)
    return q, k, v, o, lse


def _backward(do, q, k, v, o, lse, block_m, block_n):
    # Δ = rowsum(dO ∘ O): an elementwise product and a sum, which PyTorch does at memory speed.
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, Lq)
    q, do, dq = _same_layout(q, do, _empty_like(q))
    k, v, dk, dv = _same_layout(k, v, _empty_like(k), _empty_like(v))
    strides, sizes = _launch_args(q, k, block_m, block_n, backward=True)
    scales = (q.shape[-1] ** -0.5 * LOG2_E, q.shape[-1] ** -0.5)  # for the exponent, for the gradients
    bh = q.shape[0] * q.shape[1]
    _bwd_dkdv_kernel[(triton.cdiv(k.shape[2], sizes["BLOCK_N"]), bh)](
        q, k, v, do, dk, dv, lse, delta, *strides, *scales, **sizes)
    _bwd_dq_kernel[(triton.cdiv(q.shape[2], sizes["BLOCK_M"]), bh)](
        q, k, v, do, dq, lse, delta, *strides, *scales, **sizes)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Autograd glue: forward saves q, k, v, out and L (O(L·D) memory), backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, block_m=None, block_n=None):
        q, k, v, o, lse = _forward(q, k, v, block_m, block_n)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.blocks = (block_m, block_n)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        dq, dk, dv = _backward(do, *ctx.saved_tensors, *ctx.blocks)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, block_m=None, block_n=None):
    """softmax(q kᵀ / √D) v for q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D), differentiable.

    Same contract as minidb.attention.attention_math without `causal`. block_m / block_n override the
    tile sizes (powers of two ≥ 16), e.g. small tiles so the CPU interpreter exercises the tails.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attention needs q (B, H, Lq, D) and k, v (B, H, Lk, D); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention needs q, k, v of one dtype among fp16, bf16, fp32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head dims up to {MAX_HEAD_DIM}; got {q.shape[-1]} (use SDPA).")
    return FlashAttention.apply(q, k, v, block_m, block_n)
