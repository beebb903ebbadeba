"""Sampling's CUDA graph (minidb/graphs.py): replayed UNet steps give the latents eager steps give,
for every sampler, SD and SDXL, fp32 and fp16; a UNet that cannot be recorded runs eagerly with a
warning; off the GPU nothing changes. The GPU tests skip without one."""

import pytest
import torch

from conftest import tiny_model
from minidb import text_encoder as te, unet as un, vae as va
from minidb.graphs import UnetGraph, can_graph
from minidb.load import StableDiffusion
from minidb.pipeline import SAMPLERS, sample_latents
from minidb.tokenizer import Tokenizer
from test_sdxl import TINY_G, TINY_L, TINY_SDXL_UNET
from test_sdxl_pipeline import TINY_XL_VAE

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def tiny_sdxl():
    torch.manual_seed(0)
    return StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(TINY_L), va.AutoencoderKL(TINY_XL_VAE),
                           un.UNet(TINY_SDXL_UNET), "SDXL", "epsilon", tokenizer_2=Tokenizer.for_version("SD 2.x"),
                           text_encoder_2=te.TextEncoder(TINY_G))


def on_gpu(model, dtype=None):
    """Every part of the model on the GPU (in dtype, if given), in eval mode."""
    for part in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if part is not None:
            part.to("cuda") if dtype is None else part.to("cuda", dtype)
            part.eval()
    return model


def counting_replays(monkeypatch):
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    return replays


def test_off_the_gpu_the_unet_runs_as_always(monkeypatch):
    model = tiny_model()
    model.unet.eval()
    assert not can_graph(model.unet, torch.zeros(1))
    monkeypatch.setattr(UnetGraph, "__call__", lambda *a: pytest.fail("a CUDA graph was used on the CPU"))
    kw = dict(steps=3, height=32, width=32, progress=False)
    a = sample_latents(model, "a dog", **kw)
    b = sample_latents(model, "a dog", cuda_graph=False, **kw)
    assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("family", ["SD 1.x", "SDXL"])
def test_replayed_steps_equal_eager_steps(family, sampler, monkeypatch):
    model = on_gpu(tiny_model() if family == "SD 1.x" else tiny_sdxl())
    kw = dict(steps=4, sampler=sampler, seed=3, height=32, width=32, progress=False, n=2)
    eager = sample_latents(model, "a photo of sks dog", "blurry", cuda_graph=False, **kw)
    replays = counting_replays(monkeypatch)
    graphed = sample_latents(model, "a photo of sks dog", "blurry", **kw)
    assert len(replays) == 3  # step 1 eager (the warm-up), steps 2-4 replayed
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@gpu
def test_fp16_replays_equal_eager(monkeypatch):
    model = on_gpu(tiny_sdxl(), torch.float16)
    kw = dict(steps=5, sampler="euler", seed=0, height=32, width=32, progress=False)
    eager = sample_latents(model, "a dog", cuda_graph=False, **kw)
    replays = counting_replays(monkeypatch)
    graphed = sample_latents(model, "a dog", **kw)
    assert len(replays) == 4
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=2e-3, atol=2e-3)


@gpu
def test_training_mode_and_autocast_stay_eager(monkeypatch):
    model = on_gpu(tiny_model())
    replays = counting_replays(monkeypatch)
    model.unet.train()
    sample_latents(model, "a dog", steps=3, height=32, width=32, progress=False)
    model.unet.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sample_latents(model, "a dog", steps=3, height=32, width=32, progress=False)
    assert not replays


@gpu
def test_a_unet_that_cannot_be_recorded_runs_eagerly(monkeypatch):
    model = on_gpu(tiny_model())
    kw = dict(steps=4, seed=1, height=32, width=32, progress=False)
    eager = sample_latents(model, "a dog", cuda_graph=False, **kw)

    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    with pytest.warns(UserWarning, match="could not be recorded as a CUDA graph"):
        fallback = sample_latents(model, "a dog", **kw)
    torch.testing.assert_close(fallback, eager, rtol=1e-5, atol=1e-5)


@gpu
def test_a_kept_graph_records_once_and_again_for_other_shapes(monkeypatch):
    """sample.py and the class prior keep one UnetGraph for all their pictures: recorded once while the
    shapes stay, recorded again when they change, equal to eager throughout."""
    model = on_gpu(tiny_model())
    graph = UnetGraph(model.unet)
    replays = counting_replays(monkeypatch)
    recordings = []
    for seed, size in [(0, 32), (1, 32), (2, 32), (3, 48)]:
        kw = dict(steps=3, seed=seed, height=size, width=size, progress=False)
        eager = sample_latents(model, "a dog", cuda_graph=False, **kw)
        torch.testing.assert_close(sample_latents(model, "a dog", graph=graph, **kw), eager, rtol=1e-5, atol=1e-5)
        recordings.append(graph.graph)
    assert recordings[0] is recordings[1] is recordings[2] and recordings[3] is not recordings[2]
    assert len(replays) == 2 + 3 + 3 + 2  # the warm-up and the recording's step come once per shape
