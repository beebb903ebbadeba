"""Sampling's CUDA graph (minidb/graphs.py): replayed UNet steps give the latents eager steps give,
for every sampler, SD and SDXL, fp32 and fp16; a UNet that cannot be recorded runs eagerly with a
warning; off the GPU nothing changes. The GPU tests skip without one; on the CPU, stand-ins for the two
CUDA calls check the bookkeeping around them."""

import sys

import pytest
import torch

from conftest import tiny_model
from minidb import graphs, pipeline, text_encoder as te, unet as un, vae as va
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


class Recordings:
    """CPU stand-ins for the two CUDA steps of minidb/graphs.py, so that UnetGraph's bookkeeping runs in
    every test run: the warm-up runs eagerly, and a "recording" keeps the function, with its output
    poisoned (NaN) the way a real recording leaves it unwritten, until a replay runs the function again on
    whatever the fixed input buffers then hold."""

    def __init__(self, monkeypatch):
        self.graphs, self.replays = [], 0
        monkeypatch.setattr(graphs, "warm_up", lambda fn, device: fn())
        monkeypatch.setattr(graphs, "record", self.record)
        monkeypatch.setattr(pipeline, "can_graph", lambda unet, x: not unet.training)

    def record(self, fn):
        out = fn().fill_(float("nan"))
        test = self

        class Graph:
            def replay(self):
                test.replays += 1
                out.copy_(fn())
        self.graphs.append(Graph())
        return self.graphs[-1], out


def test_the_graph_bookkeeping_equals_eager_sampling(monkeypatch):
    """Inputs copied into the fixed buffers at every step, one recording while the shapes stay, a new
    one when they change, outputs copied out before the next replay: equal to eager, on the CPU."""
    model = tiny_model()
    model.unet.eval()
    fake, graph = Recordings(monkeypatch), UnetGraph(model.unet)
    for seed, size, sampler in [(0, 32, "euler"), (1, 32, "euler"), (2, 48, "ddim")]:
        kw = dict(steps=3, seed=seed, height=size, width=size, progress=False, sampler=sampler, n=2)
        eager = sample_latents(model, "a dog", "blurry", cuda_graph=False, **kw)
        torch.testing.assert_close(sample_latents(model, "a dog", "blurry", graph=graph, **kw), eager, rtol=0, atol=0)
    assert len(fake.graphs) == 2 and fake.replays == 2 + 3 + 2  # the warm-up and the recording: once per shape
    sample_latents(model, "a dog", steps=3, height=48, width=48, progress=False, sampler="euler", graph=graph)
    assert len(fake.graphs) == 3  # Euler's timesteps are fractional (float), DDIM's integers: recorded again
    model.unet.train()
    sample_latents(model, "a dog", steps=3, height=32, width=32, progress=False, graph=graph)
    assert fake.replays == 9  # a UNet in training mode runs eagerly


def test_a_recording_that_fails_falls_back_to_eager_with_a_warning(monkeypatch):
    model = tiny_model()
    model.unet.eval()
    Recordings(monkeypatch)
    kw = dict(steps=3, seed=1, height=32, width=32, progress=False)
    eager = sample_latents(model, "a dog", cuda_graph=False, **kw)

    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "record", refuse)
    handling = []  # the exception in hand at each UNet call: none (its traceback would hold the recording)
    model.unet.register_forward_pre_hook(lambda *_: handling.append(sys.exc_info()[1]))
    with pytest.warns(UserWarning, match="could not be recorded as a CUDA graph"):
        torch.testing.assert_close(sample_latents(model, "a dog", **kw), eager, rtol=0, atol=0)
    assert len(handling) == 3 and not any(handling)


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


def test_an_output_outlives_the_next_replay(monkeypatch):
    """Each call's output is its own tensor, not the recording's, which the next replay overwrites."""
    model = tiny_model()
    model.unet.eval()
    Recordings(monkeypatch)
    graph, g = UnetGraph(model.unet), torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, model.unet.cfg.context_dim, generator=g)
    xs = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    with torch.no_grad():  # as sampling calls it
        outs = [graph(x, torch.tensor(500), context) for x in xs]  # the warm-up, the recording, a replay
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, model.unet(x, torch.tensor(500), context), rtol=0, atol=0)
