"""Parity of each model part with its reference at tiny configs: same weights, same inputs, same numbers."""

import pytest
import torch
import torch.nn.functional as F

from conftest import (TINY_TEXT, assert_close, TINY_UNET, diffusers_unet, diffusers_vae, text_twin, transformers_text_encoder,
                      unet_twin, vae_twin)
from minidb import vae as va
from minidb.convert import native_to_diffusers_names, unet_blocks
from minidb.attention import attention, attention_math

FAMILIES = ["SD 1.x", "SD 2.x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_matches_transformers(family):
    cfg = TINY_TEXT[family]
    ref = transformers_text_encoder(cfg)
    ours = text_twin(ref, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_matches_diffusers(family):
    cfg = TINY_UNET[family]
    ref = diffusers_unet(cfg)
    ours = unet_twin(ref, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    ctx = torch.randn(3, 77, cfg.context_dim, generator=g)
    # batched timesteps, each sample its own (training); then one scalar for the batch (sampling);
    # then fractional ones (Euler-style samplers feed them)
    for t in (torch.tensor([0, 421, 999]), torch.tensor(500), torch.tensor([12.5, 500.25, 998.75])):
        with torch.no_grad():
            assert_close(ours(x, t, ctx), ref(x, t, ctx).sample)


@pytest.mark.parametrize("h,w", [(24, 40), (13, 9)])
def test_unet_odd_latent_size_matches_diffusers(h, w):
    # 24x40: not square; 13x9: not a multiple of the UNet's downsampling, so the way up must
    # upsample to the skip connections' sizes (images of 104x72 px)
    cfg = TINY_UNET["SD 1.x"]
    ref = diffusers_unet(cfg, seed=3)
    ours = unet_twin(ref, cfg)
    x, ctx = torch.randn(1, 4, h, w), torch.randn(1, 77, cfg.context_dim)
    with torch.no_grad():
        assert_close(ours(x, torch.tensor([250]), ctx), ref(x, torch.tensor([250]), ctx).sample)


def test_unet_gradients_match_diffusers():
    # Training needs the backward pass to be right too, for every parameter.
    cfg = TINY_UNET["SD 1.x"]
    ref = diffusers_unet(cfg)
    ours = unet_twin(ref, cfg)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, cfg.context_dim), torch.tensor([3, 700])
    ref(x, t, ctx).sample.square().mean().backward()
    ours(x, t, ctx).square().mean().backward()
    names = native_to_diffusers_names(ours.state_dict().keys(), unet_blocks(cfg))
    ref_params = dict(ref.named_parameters())
    ref_grads = {k: ref_params[names[k]].grad for k, _ in ours.named_parameters()}
    largest = max(g.abs().max().item() for g in ref_grads.values())
    # Each parameter against its own scale: gradients span 10 orders of magnitude here, and a tolerance
    # scaled by the largest would let the small ones (a transformer block's norm2, ~2e-5) be anything.
    # Measured on the CPU (1 and 2 threads) the gradients are bit for bit diffusers', so rtol is
    # assert_close's fp32 default. The floor, 1e-6 of the largest, is for gradients that are zero by
    # construction and left as rounding noise (~1e-9: e.g. a ResBlock's emb_layers.1.bias, a constant per
    # channel just before a GroupNorm of one channel per group).
    for k, p in ours.named_parameters():
        err, scale = (p.grad - ref_grads[k]).abs().max().item(), ref_grads[k].abs().max().item()
        assert err <= 1e-5 * scale + 1e-6 * largest, f"{k}: max abs error {err:.3g} at gradient scale {scale:.3g}"


def test_vae_encode_decode_match_diffusers():
    cfg = va.TINY
    ref = diffusers_vae(cfg)
    ours = vae_twin(ref, cfg)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(image), ref.encode(image).latent_dist
        assert_close(post.mean, ref_post.mean)
        assert_close(post.logvar, ref_post.logvar)
        # sampling draws the same noise from the same generator
        s = post.sample(torch.Generator().manual_seed(7))
        assert_close(s, ref_post.sample(torch.Generator().manual_seed(7)))
        z = torch.randn(2, cfg.z_channels, 16, 16)  # the tiny VAE downsamples 2x, SD's 8x
        assert_close(ours.decode(z), ref.decode(z).sample)
    assert ours.decode(z).shape == (2, 3, 32, 32)


def test_latent_scale_matches_diffusers_default():
    assert va.LATENT_SCALE == diffusers_vae(va.TINY).config.scaling_factor == 0.18215


# self-attention, cross-attention to 77 text tokens, and the text encoder's causal self-attention
@pytest.mark.parametrize("lq,lk,causal", [(64, 64, False), (50, 77, False), (77, 77, True), (7, 7, True)])
def test_attention_backends_agree(monkeypatch, lq, lk, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    # float64 oracle written out independently of both backends
    scores = q @ k.transpose(-1, -2) / 40**0.5
    if causal:
        scores = scores + torch.full((lq, lk), float("-inf"), dtype=torch.float64).triu(1)
    expected = scores.softmax(-1) @ v
    for backend in ("math", "sdpa"):
        monkeypatch.setenv("MINIDB_ATTENTION", backend)
        out = attention(q.float(), k.float(), v.float(), causal=causal)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_upcast_computes_in_fp32(monkeypatch, dtype):
    # On the CPU, SDPA computes half precision in fp32 inside, so its outputs cannot tell whether minidb
    # upcast: check the dtype SDPA is handed.
    monkeypatch.setenv("MINIDB_ATTENTION", "sdpa")
    handed, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: handed.append({q.dtype, k.dtype, v.dtype}) or sdpa(q, k, v, **kw))
    q, k, v = (torch.randn(1, 2, 16, 64).to(dtype) * 30 for _ in range(3))
    exact = attention_math(q.float(), k.float(), v.float())
    out = attention(q, k, v, upcast=True)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
    attention(q, k, v)  # without upcast, the input's own dtype
    assert handed == [{torch.float32}, {dtype}]


def test_unknown_attention_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MINIDB_ATTENTION", "flashy")
    with pytest.raises(ValueError, match="MINIDB_ATTENTION='flashy' is not a backend"):
        attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)))


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    cfg = TINY_UNET["SD 2.x"]
    ours = unet_twin(diffusers_unet(cfg), cfg).train()
    x, ctx, t = torch.randn(2, 4, 12, 12), torch.randn(2, 77, cfg.context_dim), torch.tensor([3, 700])
    blocks = [*ours.input_blocks, ours.middle_block, *ours.output_blocks]  # what UNet.run checkpoints
    grads, runs = [], []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        started = []
        hooks = [b.register_forward_pre_hook(lambda block, args: started.append(block)) for b in blocks]
        ours(x, t, ctx).square().mean().backward()
        for h in hooks:
            h.remove()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
        runs.append([sum(s is b for s in started) for b in blocks])
    # checkpointed, each block starts again in the backward pass, to recompute what it did not store (a pre-hook:
    # torch stops the recomputation once it has what it needs, so forward hooks may not see it end)
    assert runs == [[1] * len(blocks), [2] * len(blocks)]
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
