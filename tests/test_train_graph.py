"""train.py's UNet step replayed as CUDA graphs (minidb/graphs.py TrainingGraph): which runs record it;
replayed steps give the losses, gradients and trained weights of eager steps (SD and SDXL, bf16
autocast, AdamW between steps, gradients added up over micro-batches, gradients for a context that
trains); a step that cannot be recorded runs eagerly with a warning; train.py itself trains the same
LoRA replayed as eager. The GPU tests skip without one; the fallback runs on the CPU."""

import json
import sys

import pytest
import torch

import train
from conftest import tiny_model
from minidb import graphs
from minidb.graphs import TrainingGraph, can_graph_training
from minidb.loop import hold_frozen
from minidb.lora import LoRA
from minidb.files import read_tensors
from test_graphs import counting_replays, gpu, tiny_sdxl
from test_train import run, world  # noqa: F401 (world: the module fixture run() trains in)


def test_only_a_frozen_unet_on_cuda_in_one_process_is_recorded():
    assert can_graph_training("cuda", "lora", False, 1) and can_graph_training("cuda:1", "textual-inversion", False, 1)
    assert not can_graph_training("cpu", "lora", False, 1)
    assert not can_graph_training("cuda", "full", False, 1)  # every UNet weight's gradient: another UNet of memory
    assert not can_graph_training("cuda", "lora", True, 1)  # gradient checkpointing
    assert not can_graph_training("cuda", "lora", False, 2)  # torchrun


class Recordings:
    """CPU stand-ins for TrainingGraph's CUDA calls, so that its bookkeeping runs in every test run: the
    warm-up runs in place; a recorded forward replays by running the UNet again on the fixed input buffers
    into the fixed output, a recorded backward by taking that forward's gradients with the fixed output
    gradient into the fixed gradients. What a recording writes is poisoned (NaN) until a replay, as a
    real recording leaves it unwritten."""

    def __init__(self, monkeypatch):
        monkeypatch.setattr(graphs, "warm_up", lambda fn, device: fn())
        monkeypatch.setattr(graphs, "record", self.record)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
        self.graph, self.live, self.replays = None, None, 0  # graph: the TrainingGraph, set by the test

    def record(self, fn, pool=None):
        out, test = fn(), self
        if torch.is_tensor(out):  # the forward

            class Graph:
                def replay(self):
                    test.replays += 1
                    with torch.enable_grad():  # (replayed from inside an autograd Function's forward)
                        test.live = fn()
                    with torch.no_grad():
                        out.copy_(test.live)
        else:  # the backward: the gradients

            class Graph:
                def replay(self):
                    test.replays += 1
                    g = test.graph
                    wanting = [b for b in g.inputs if b is not None and b.requires_grad] + g.trained
                    with torch.no_grad():
                        for static, new in zip(out, torch.autograd.grad(test.live, wanting, g.grad_output), strict=True):
                            static.copy_(new)
        with torch.no_grad():
            for t in [out] if torch.is_tensor(out) else out:
                t.fill_(float("nan"))
        return Graph(), out


def recordings(device, monkeypatch):
    """-> a function that counts replays: CUDA's own on the GPU, the stand-ins' on the CPU."""
    if device == "cuda":
        replays = counting_replays(monkeypatch)
        return lambda graph: len(replays)
    fake = Recordings(monkeypatch)

    def count(graph):
        fake.graph = graph
        return fake.replays
    return count


DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


def lora_model(family, device, dtype=torch.bfloat16):
    """A tiny model whose frozen UNet carries a LoRA with non-zero weights (so that every adapter gets a
    gradient from the first step), held as train.py holds it under autocast, in training mode."""
    model = tiny_model() if family == "SD 1.x" else tiny_sdxl()
    model.unet.requires_grad_(False).train()
    lora = LoRA(model, rank=4)
    with torch.no_grad():
        for adapter in lora.children():
            adapter.lora_up.weight.normal_(0, 0.05)
    model.unet.to(device)
    lora.to(device).attach()
    if dtype is not None:
        hold_frozen(model.unet, dtype, device)
    return model, lora


def batches(model, device, steps, micro=1, context_dtype=torch.bfloat16):
    """`steps` lists of `micro` micro-batches (x_t, t, context, y, target), 2 examples each."""
    cfg, g = model.unet.cfg, torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            x, target = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
            t = torch.randint(0, 1000, (2,), generator=g)
            context = torch.randn(2, 77, cfg.context_dim, generator=g).to(context_dtype)
            y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
            step.append([None if v is None else v.to(device) for v in (x, t, context, y, target)])
        out.append(step)
    return out


def train_steps(unet, params, steps, dtype=torch.bfloat16, text=None):
    """AdamW over `params` (and `text`, a context offset that trains) for the given steps, the UNet called
    as train.py calls it, under autocast -> (losses, each step's gradients, the weights after)."""
    trained = list(params) + ([text] if text is not None else [])
    opt = torch.optim.AdamW(trained, lr=1e-2)  # steps large enough that stale weights would show
    losses, grads = [], []
    for step in steps:
        for x, t, context, y, target in step:
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                if text is not None:
                    context = context + text
                loss = (unet(x, t, context, y).float() - target).square().mean()
            loss.backward()
            losses.append(loss.item())
        grads.append([p.grad.clone() for p in trained])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in trained]


def assert_same_training(replayed, eager, exact=False):
    """exact: bit for bit (the CPU's stand-ins run the very same operations); else within what kernels
    that add in another order give (CUDA's flash attention backward, say)."""
    (losses, grads, weights), (losses_e, grads_e, weights_e) = replayed, eager
    rtol = 0 if exact else 1e-3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_e), rtol=rtol, atol=0)
    for step, (a, b) in enumerate(zip(grads, grads_e, strict=True)):
        for g, e in zip(a, b, strict=True):
            assert e.abs().max() > 0  # every adapter learns
            assert (g - e).norm() <= rtol * e.norm(), f"step {step + 1}'s gradients differ by {((g - e).norm() / e.norm()).item():.3g}"
    for w, e in zip(weights, weights_e, strict=True):
        torch.testing.assert_close(w, e, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["SD 1.x", "SDXL"])
def test_replayed_training_steps_equal_eager_steps(family, device, monkeypatch):
    """Three steps with AdamW between them (the replays read the adapters' updated weights in place);
    bf16 autocast on the GPU, fp32 on the CPU (its stand-ins)."""
    dtype = torch.bfloat16 if device == "cuda" else None
    model, lora = lora_model(family, device, dtype)
    steps = batches(model, device, 3, context_dtype=dtype or torch.float32)
    start = {k: v.clone() for k, v in lora.state_dict().items()}
    eager = train_steps(model.unet, lora.parameters(), steps, dtype)
    lora.load_state_dict(start)
    replays = recordings(device, monkeypatch)
    graph = TrainingGraph(model.unet, list(lora.parameters()), dtype, forget=lora.drop_casts)
    replays(graph)
    assert_same_training(train_steps(graph, lora.parameters(), steps, dtype), eager, exact=device == "cpu")
    assert replays(graph) == 3 + 3 and not graph.failed  # a forward and a backward per step, recorded once
    assert all(a.cast is None for a in lora.children())  # the recording's cast copies were let go
    # (and the eager steps' before it: their autograd nodes, on the default stream, would break the recording)
    graph.release()
    assert graph.forward_graph is None and graph.key is None  # the next call records again


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_add_up_over_micro_batches_and_reach_a_context_that_trains(device, monkeypatch):
    """--grad-accum 2, and the text side training (a new word, --train-text-encoder): the context's
    gradient comes out of the recorded backward too."""
    dtype = torch.bfloat16 if device == "cuda" else None
    model, lora = lora_model("SDXL", device, dtype)
    steps = batches(model, device, 2, micro=2, context_dtype=dtype or torch.float32)
    start = {k: v.clone() for k, v in lora.state_dict().items()}
    text = torch.zeros(77, model.unet.cfg.context_dim, device=device, requires_grad=True)
    eager = train_steps(model.unet, lora.parameters(), steps, dtype, text=text)
    lora.load_state_dict(start)
    with torch.no_grad():
        text.zero_()
    replays = recordings(device, monkeypatch)
    graph = TrainingGraph(model.unet, list(lora.parameters()), dtype, forget=lora.drop_casts)
    replays(graph)
    assert_same_training(train_steps(graph, lora.parameters(), steps, dtype, text=text), eager, exact=device == "cpu")
    assert replays(graph) == 4 + 4 and not graph.failed


@gpu
def test_a_second_forward_before_the_first_backward_is_refused():
    model, lora = lora_model("SD 1.x", "cuda")
    graph = TrainingGraph(model.unet, list(lora.parameters()), torch.bfloat16, forget=lora.drop_casts)
    (x, t, context, y, _), = batches(model, "cuda", 1)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = graph(x, t, context).float().square().mean()
        graph(x, t, context)
    with pytest.raises(RuntimeError, match="before the backward of the one before it"):
        first.backward()


@gpu
def test_train_py_trains_the_same_lora_replayed_as_eager(world, tmp_path, monkeypatch):  # noqa: F811
    """A bf16 LoRA run on the GPU, with its UNet step recorded (the default) and eager: the same losses
    and the same adapters, the recording let go for the validation grid and drift score after step 2
    and recorded again."""
    replays = counting_replays(monkeypatch)
    flags = ("--method", "lora", "--mixed-precision", "bf16", "--device", "cuda", "--validate-every", 2)
    recordings = []
    record = TrainingGraph._record
    monkeypatch.setattr(TrainingGraph, "_record", lambda self, values: (recordings.append(1), record(self, values))[1])
    replayed = run(world, tmp_path / "replayed", *flags)
    assert len(recordings) == 2 and replays  # at step 1, and at step 3 after the grid and drift score of step 2
    with monkeypatch.context() as m:
        m.setattr(train, "can_graph_training", lambda *a: False)
        eager = run(world, tmp_path / "eager", *flags)
    losses = [[json.loads(line)["loss"] for line in open(out / "log.jsonl")] for out in (replayed, eager)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-3, atol=0)
    a, b = (read_tensors(out / "lora.safetensors")[0] for out in (replayed, eager))
    assert a.keys() == b.keys()
    for key in a:
        diff, size = (a[key].float() - b[key].float()).norm(), b[key].float().norm()
        assert diff <= 1e-2 * size + 1e-6, f"{key} differs by {(diff / size).item():.3g}"


@pytest.mark.parametrize("refused", ["forward", "backward"])
def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(monkeypatch, refused):
    """On the CPU, with the warm-up run in place and the forward's or the backward's recording refused as
    CUDA refuses an operation it cannot record: a warning, the eager output and gradients, and the LoRA's
    cast copies let go; and the eager step runs with the recording let go, not while its exception is
    being handled (whose traceback holds the recording's tensors: memory the eager step may need)."""
    model, lora = lora_model("SD 1.x", "cpu", dtype=None)
    monkeypatch.setattr(graphs, "warm_up", lambda fn, device: fn())
    recordings = []

    def refuse(fn, pool=None):
        recordings.append(fn)
        if refused == "forward" or len(recordings) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return object(), fn()
    monkeypatch.setattr(graphs, "record", refuse)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    (x, t, context, y, target), = batches(model, "cpu", 1, context_dtype=torch.float32)[0]
    graph = TrainingGraph(model.unet, list(lora.parameters()), None, forget=lora.drop_casts)
    handling = []
    hook = model.unet.register_forward_pre_hook(lambda *_: handling.append((sys.exc_info()[1], graph.forward_graph)))
    with pytest.warns(UserWarning, match="could not be recorded as CUDA graphs"):
        fallback = graph(x, t, context)
    hook.remove()
    assert handling[-1] == (None, None)  # the eager call: no exception in hand, no half recording kept
    fallback.square().mean().backward()
    grads = [p.grad.clone() for p in lora.parameters()]
    lora.zero_grad(set_to_none=True)
    eager = model.unet(x, t, context)
    eager.square().mean().backward()
    torch.testing.assert_close(fallback, eager, rtol=0, atol=0)
    for g, p in zip(grads, lora.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    assert graph.failed and graph(x, t, context) is not None  # eager from then on, without another warning
