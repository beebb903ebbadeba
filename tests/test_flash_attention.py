"""The Triton FlashAttention kernel (minidb/flash_attention.py) against float64 attention: the output and
all three gradients, SD's head dims, ragged lengths, cross-attention to 77 text tokens; and the dispatch
that sends the UNet through it. Without a GPU the kernels run in Triton's CPU interpreter, about 100x
slower than SDPA, so the CPU shapes are small; the GPU class adds bf16 and SD's real sizes."""

import os
import types

import pytest
import torch

# The interpreter must be on when @triton.jit functions are defined; conftest.py switches it on
# before anything imports triton when there is no GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")

from conftest import TINY_UNET, assert_close, randomize_  # noqa: E402
from minidb import flash_attention as fa  # noqa: E402
from minidb import unet as un  # noqa: E402
from minidb.attention import KERNEL_MAX_HEAD_DIM, attention, attention_math  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # max error / max |reference|


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element they never write fails the test."""
    monkeypatch.setattr(fa, "_empty_like", lambda x, **kw: torch.full_like(x, float("nan"), **kw))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the kernel through minidb.attention's dispatch."""
    calls, kernel = [], fa.flash_attention
    monkeypatch.setattr(fa, "flash_attention", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    return calls


def reference(q, k, v, do):
    """float64 attention written out, and its three gradients by autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
    return (out, *torch.autograd.grad(out, (q, k, v), do.double()))


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def check(q, k, v, run=fa.flash_attention, seed=0, tol=None):
    """run(q, k, v)'s output and dq, dk, dv against float64, relative to each one's largest entry."""
    do = randn(*q.shape, dtype=q.dtype, seed=seed + 1)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = run(q, k, v)
    ours = (out, *torch.autograd.grad(out, (q, k, v), do))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference(q, k, v, do)):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: NaN or inf, e.g. an element no kernel wrote"
        err, scale = (a.double() - b).abs().max().item(), b.abs().max().item()
        assert err <= (tol or TOL[q.dtype]) * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


# Lengths that are not multiples of the 16-row test tiles, so the last block of every loop is partial:
# self-attention on a ragged grid, and the UNet's cross-attention to 77 text tokens.
@pytest.mark.parametrize("lq,lk", [(37, 53), (37, 77)], ids=["ragged", "cross77"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [40, 64, 80, 160])  # SD 1's head dims (padded) and SD 2's
def test_matches_float64(d, dtype, lq, lk):
    q, k, v = (randn(2, 3, n, d, dtype=dtype, seed=s) for s, n in enumerate((lq, lk, lk)))
    check(q, k, v, run=lambda q, k, v: fa.flash_attention(q, k, v, block_m=16, block_n=16))


def test_default_tiles_and_tiny_head_dim():
    # The GPU tile sizes (more query rows than one tile, a partial last tile), and a head dim below
    # 16, the smallest extent tl.dot takes, with only 3 keys.
    q, k, v = (randn(1, 2, n, 40, dtype=torch.float16, seed=s) for s, n in enumerate((150, 77, 77)))
    check(q, k, v)
    q, k, v = (randn(2, 1, n, 8, dtype=torch.float32, seed=s) for s, n in enumerate((5, 3, 3)))
    check(q, k, v)


# The dk/dv kernel computes inf and NaN in the padded key rows it then does not store; numpy warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_all_scores_very_negative():
    # Every key points away from every query: scores around -800. The zero-padded keys of the last
    # tile then score 0, far above the real ones; they must still get no weight, forward and backward.
    # (Scores this large carry fp32 rounding of ~1e-4 in any implementation; attention_math's is 7e-5.)
    u = randn(1, 1, 1, 64, dtype=torch.float32, seed=0)
    q = 10 * u + randn(1, 2, 5, 64, dtype=torch.float32, seed=1) / 2
    k = -10 * u + randn(1, 2, 20, 64, dtype=torch.float32, seed=2) / 2
    assert (q @ k.transpose(-1, -2)).max() / 8 < -500
    v = randn(1, 2, 20, 64, dtype=torch.float32, seed=3)
    check(q, k, v, run=lambda q, k, v: fa.flash_attention(q, k, v, block_m=16, block_n=16), tol=1e-3)


def test_strided_inputs_as_the_unet_passes_them():
    # The UNet hands over views "b l (h d) -> b h l d" (not contiguous); the output gets q's layout so
    # the UNet's rearrange back is free. Here v has yet another layout, which the wrapper copies.
    q, k = (randn(2, n, 3 * 40, dtype=torch.float32, seed=s).unflatten(-1, (3, 40)).transpose(1, 2)
            for s, n in ((0, 37), (1, 53)))
    v = randn(2, 3, 40, 53, dtype=torch.float32, seed=2).transpose(-1, -2)
    check(q, k, v, run=lambda q, k, v: fa.flash_attention(q, k, v, block_m=16, block_n=16))
    assert fa.flash_attention(q, k, v).stride() == q.stride()


def test_large_scores_need_no_upcast(monkeypatch, kernel_calls):
    # SD 2.1's reason for upcasting: fp16 scores q·k/√D beyond 65504 overflow. The kernel keeps the
    # scores in fp32, so the dispatch hands it fp16 even with upcast=True. (Forward only: a softmax this
    # peaked is one-hot, and its gradients are rounding noise around 0.)
    monkeypatch.setenv("MINIDB_ATTENTION", "triton")
    q, k, v = (randn(1, 2, 33, 64, dtype=torch.float16, seed=s, scale=scale) for s, scale in enumerate((200, 200, 1)))
    assert (q.float() @ k.float().transpose(-1, -2) / 8).abs().max() > 65504  # fp16 scores would overflow
    out, expected = attention(q, k, v, upcast=True), reference(q, k, v, torch.zeros_like(q))[0]
    assert torch.isfinite(out).all() and (out.double() - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert len(kernel_calls) == 1


def test_bad_inputs_are_clear_errors():
    x = torch.zeros(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        fa.flash_attention(*(torch.zeros(1, 1, 4, 512, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="one dtype"):
        fa.flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="q \\(B, H, Lq, D\\)"):
        fa.flash_attention(x, x[:, :, :, :4], x)
    assert KERNEL_MAX_HEAD_DIM == fa.MAX_HEAD_DIM


# ---- the dispatch (minidb.attention) ----

@pytest.fixture
def no_tf32():
    """TF32 off, as on a GPU TF32 convs and matmuls would round the kernel's 1e-7 differences up.
    Set and restored by hand: monkeypatch restores with delattr on pytest >= 9.2, which torch's
    cuBLAS switch refuses, and a failed restore would leak into every later test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("family", ["SD 1.x", "SD 2.x"])  # conv/linear projections, 2 heads/head dim 16, upcast
def test_unet_through_the_kernel_matches_math(monkeypatch, kernel_calls, no_tf32, family):
    # Forward and backward of a tiny UNet, every attention through the kernel, against the math backend.
    unet = randomize_(un.UNet(TINY_UNET[family])).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY_UNET[family].context_dim, generator=g)
    x, ctx, t = x.to(DEVICE), ctx.to(DEVICE), torch.tensor([3, 700], device=DEVICE)
    results = {}
    for backend in ("math", "triton"):
        monkeypatch.setenv("MINIDB_ATTENTION", backend)
        unet.zero_grad()
        x_in = x.clone().requires_grad_()
        out = unet(x_in, t, ctx)
        out.square().mean().backward()
        grads = [x_in.grad.flatten()] + [p.grad.flatten() for p in unet.parameters()]
        results[backend] = (out.detach(), torch.cat(grads))
    assert len(kernel_calls) == 2 * 7  # 7 transformer blocks (down 2, middle 1, up 4), self + cross each
    assert_close(results["triton"][0], results["math"][0])
    assert_close(results["triton"][1], results["math"][1], rtol=1e-4)


def test_causal_and_wide_heads_never_reach_the_kernel(monkeypatch, kernel_calls):
    # The text encoder's causal attention and the VAE's 512-wide head go to SDPA even when forced.
    monkeypatch.setenv("MINIDB_ATTENTION", "triton")
    q, k, v = (randn(2, 3, 77, 64, dtype=torch.float32, seed=s) for s in range(3))
    assert torch.allclose(attention(q, k, v, causal=True), attention_math(q, k, v, causal=True), atol=1e-5)
    wide = randn(1, 1, 16, 512, dtype=torch.float32, seed=3)
    assert torch.allclose(attention(wide, wide, wide), attention_math(wide, wide, wide), atol=1e-5)
    assert kernel_calls == []


@pytest.mark.parametrize("faster", [False, True])
def test_auto_picks_the_kernel_only_for_half_precision_on_cuda_and_only_while_it_is_faster(monkeypatch, kernel_calls,
                                                                                            faster):
    import minidb.attention as dispatch
    monkeypatch.setattr(dispatch, "KERNEL_IS_FASTER", faster)
    monkeypatch.setattr(dispatch, "_kernel_failed", [])
    monkeypatch.setenv("MINIDB_ATTENTION", "auto")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        attention(*(torch.randn(1, 2, 16, 40).to(dtype),) * 3)  # on the CPU: SDPA, interpreter or not
    assert kernel_calls == []
    # the decision for CUDA tensors, asked of stand-ins so that it is checked without a GPU too
    for is_cuda in (False, True):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q = types.SimpleNamespace(is_cuda=is_cuda, dtype=dtype)
            assert dispatch._auto_picks_kernel(q) == (faster and is_cuda and dtype != torch.float32), (is_cuda, dtype)
    monkeypatch.setattr(dispatch, "_kernel_failed", [RuntimeError("out of resources")])
    assert not dispatch._auto_picks_kernel(types.SimpleNamespace(is_cuda=True, dtype=torch.float16))  # failed once


def test_forcing_triton_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MINIDB_ATTENTION", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="MINIDB_ATTENTION=triton needs the triton package and a CUDA GPU"):
        attention(*(torch.randn(1, 1, 4, 8),) * 3)


# ---- on a real GPU: bf16 too (the interpreter gets bf16 tl.dot wrong), and SD's real sizes ----

SD_SHAPES = [  # (B, H, Lq, Lk, D) at 512 px: SD 1 levels (8 heads), self- and cross-attention; SD 2 (head dim 64)
    (2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
    (2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 77, 160),
    (2, 5, 4096, 4096, 64), (2, 10, 1024, 1024, 64), (2, 20, 256, 256, 64), (2, 5, 4096, 77, 64),
    (1, 3, 1000, 333, 40),  # ragged, with the default tiles
]


@pytest.mark.skipif(INTERPRET, reason="needs a CUDA GPU (on the CPU the kernels run in Triton's interpreter)")
class TestOnGPU:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_sd_shapes_match_float64(self, shape, dtype):
        b, h, lq, lk, d = shape
        q, k, v = (randn(b, h, n, d, dtype=dtype, seed=s) for s, n in enumerate((lq, lk, lk)))
        check(q, k, v)

    @pytest.mark.parametrize("d", [40, 80, 160])
    def test_fp32_is_not_tf32(self, d):
        q, k, v = (randn(2, 4, n, d, dtype=torch.float32, seed=s) for s, n in enumerate((1000, 1000, 1000)))
        check(q, k, v)

    def test_bf16_ragged_small_tiles(self):
        q, k, v = (randn(2, 3, n, 80, dtype=torch.bfloat16, seed=s) for s, n in enumerate((37, 53, 53)))
        check(q, k, v, run=lambda q, k, v: fa.flash_attention(q, k, v, block_m=16, block_n=16))

    @pytest.mark.parametrize("faster", [False, True])
    def test_auto_sends_half_precision_to_the_kernel_only_while_it_is_faster(self, monkeypatch, kernel_calls, faster):
        import minidb.attention as dispatch
        monkeypatch.setattr(dispatch, "KERNEL_IS_FASTER", faster)
        monkeypatch.setattr(dispatch, "_kernel_failed", [])
        monkeypatch.setenv("MINIDB_ATTENTION", "auto")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            attention(*(torch.randn(1, 2, 16, 40, device="cuda").to(dtype),) * 3)
        assert len(kernel_calls) == (2 if faster else 0)  # fp16 and bf16; fp32 stays on SDPA


def test_auto_falls_back_to_sdpa_once_if_the_kernel_fails(monkeypatch):
    # e.g. a GPU whose shared memory is too small for the tiles: sampling must go on, with a warning
    import minidb.attention as dispatch
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("out of resources")

    monkeypatch.setattr(fa, "flash_attention", broken)
    monkeypatch.setattr(dispatch, "_kernel_failed", [])
    monkeypatch.setattr(dispatch, "_auto_picks_kernel", lambda q: not dispatch._kernel_failed)
    monkeypatch.setenv("MINIDB_ATTENTION", "auto")
    q, k, v = (randn(1, 2, 9, 16, dtype=torch.float32, seed=s) for s in range(3))
    with pytest.warns(UserWarning, match="using PyTorch's SDPA from now on"):
        out = attention(q, k, v)
    assert_close(out, attention_math(q, k, v))
    attention(q, k, v)
    assert calls == [1]  # not tried again
