"""LoRA in training: the fused update, adapters under gradient checkpointing and autocast, their weights cast
to autocast's dtype all at once (bit for bit as autocast casting each), and a rank wider than the layers."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_close
from minidb.load import load
from minidb.lora import LoRA
from test_load_save import reference_pipeline
from test_lora import inputs, random_lora


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_the_fused_update_adds_what_the_adapter_computes(scale):
    """add_to folds the up projection, the scale and the sum into one addmm: under bf16 autocast, and
    for an fp16 layer output with fp32 adapters (no autocast), it equals output + up(down(x)) * scale
    and keeps the output's dtype and shape."""
    from minidb.lora import Adapter
    g = torch.Generator().manual_seed(0)
    adapter = Adapter(torch.nn.Linear(24, 40), rank=4, alpha=4 * scale)
    with torch.no_grad():
        adapter.lora_up.weight.copy_(torch.randn(40, 4, generator=g))
    x, output = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 40, generator=g)
    expected = output + (x @ adapter.lora_down.weight.T) @ adapter.lora_up.weight.T * scale
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = adapter.add_to(output.bfloat16(), x)
    assert fused.dtype == torch.bfloat16 and fused.shape == output.shape
    assert_close(fused.float(), expected, rtol=0.02, atol=0.05 * expected.abs().max().item())
    fused = adapter.add_to(output.half(), x)  # the hook's fp16 model: x already in the adapter's fp32
    assert fused.dtype == torch.float16
    assert_close(fused.float(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_attached_adapters_train_under_checkpointing_and_autocast(tmp_path):
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model")
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    ids, x, t = inputs(model)
    lora = random_lora(model).attach()

    def grads(checkpointing):
        model.unet.gradient_checkpointing = model.text_encoder.encoder.gradient_checkpointing = checkpointing
        lora.zero_grad()
        model.unet(x, t, model.text_encoder(ids)).square().mean().backward()
        return [p.grad.clone() for p in lora.parameters()]

    plain, recomputed = grads(False), grads(True)
    assert all(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, recomputed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        full = model.unet(x, t, model.text_encoder(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.unet(x, t, model.text_encoder(ids))
    assert low.dtype == torch.bfloat16 and (low.float() - full).abs().mean() < 0.05 * full.abs().mean()


class Casts(TorchDispatchMode):
    """Counts the dtype copies dispatched under it: per-tensor casts, and batched ones."""

    def __init__(self):
        super().__init__()
        self.one, self.batched = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.one += name == "_to_copy"
        self.batched += name == "_foreach_copy_"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA's batched copy needs a CUDA GPU"))])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapter_weights_cast_at_once_train_bit_for_bit_as_autocast_casting_each(tmp_path, monkeypatch, checkpointing,
                                                                                 device):
    """Under autocast with gradients, each model part's forward casts all its adapters' weights in one
    batched copy, and the backward their gradients in one: the same numbers as autocast's own cast of
    each weight (bit for bit; on CUDA with deterministic kernels), with and without gradient checkpointing, and
    4 casts fewer per adapter."""
    import minidb.lora
    if device == "cuda":  # kernels that give the same sums run to run, so that bit for bit holds on CUDA too
        monkeypatch.setenv("MINIDB_ATTENTION", "math")  # (flash attention's backward adds in any order)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model", device=device)  # SD 1.x: Conv2d adapters (proj_in, proj_out) and Linear ones
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.unet.gradient_checkpointing = model.text_encoder.encoder.gradient_checkpointing = checkpointing
    ids, x, t = (v.to(device) for v in inputs(model))

    def step(lora):
        lora.attach()
        with Casts() as casts:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model.unet(x, t, model.text_encoder(ids)).float().square().mean()
            loss.backward()
        lora.detach()
        return loss, [p.grad for p in lora.parameters()], casts

    at_once = random_lora(model)
    loss, grads, casts = step(at_once)
    with monkeypatch.context() as m:
        m.setattr(minidb.lora, "_cast_all", lambda adapters: lambda part, args: None)  # autocast casts each weight
        each = random_lora(model)
        each.load_state_dict(at_once.state_dict())  # the same weights
        loss_each, grads_each, casts_each = step(each)
    assert loss.item() == loss_each.item()
    assert all(g.abs().max() > 0 for g in grads)
    for a, b in zip(grads, grads_each, strict=True):
        assert a.dtype == torch.float32
        assert torch.equal(a, b), f"gradients differ by {((a - b).abs().max() / b.abs().max()).item():.3g} of their largest"
    assert casts.batched == 4 and casts_each.batched == 0  # the text encoder's and the UNet's, each way
    if not checkpointing:  # (a recomputed block casts again)
        assert casts_each.one - casts.one == 4 * len(list(at_once.children()))
    assert all(a.cast is None for a in at_once.children())  # detach lets go of the copies


def test_the_cast_copies_follow_the_weights_over_steps_accumulation_and_validation(tmp_path, monkeypatch):
    """Three optimizer steps of two micro-batches each, a forward without gradients between steps, under
    bf16 autocast with checkpointing: the losses and the trained weights bit for bit those of autocast
    casting each weight itself (copies kept from an earlier forward would train on stale weights)."""
    import minidb.lora
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model")
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.unet.gradient_checkpointing = model.text_encoder.encoder.gradient_checkpointing = True
    ids, x, t = inputs(model)
    start = random_lora(model).state_dict()

    def train():
        lora = random_lora(model)
        lora.load_state_dict(start)
        lora.attach()
        optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model.unet(x, t, model.text_encoder(ids)).float().square().mean()
                (loss / 2).backward()
                losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a validation grid
                model.unet(x, t, model.text_encoder(ids))
        lora.detach()
        return losses, lora.state_dict()

    losses, weights = train()
    with monkeypatch.context() as m:
        m.setattr(minidb.lora, "_cast_all", lambda adapters: lambda part, args: None)  # autocast casts each weight
        losses_each, weights_each = train()
    assert losses == losses_each and len(set(losses)) == 3  # (the micro-batches of a step share their input)
    assert all(torch.equal(weights[k], weights_each[k]) for k in weights)


def test_a_rank_wider_than_every_layer_is_warned_of(tmp_path):
    """A rank past every adapted layer's own rank trains adapters bigger than their
    layers that learn nothing more; it is said, with the largest rank that means something. Up to it: silent."""
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model")
    widest = max(min(m.weight.shape[:2]) for m in LoRA(model, 1, text_encoder=True).bases.values())
    assert widest == 64  # the tiny config: UNet blocks of 32 and 64 channels, a 32-wide text encoder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRA(model, widest, text_encoder=True)
    with pytest.warns(UserWarning, match=rf"--lora-rank {widest + 1} is more than any adapted layer's own rank "
                                         rf"\(at most {widest}\).*pick --lora-rank {widest} or less\."):
        LoRA(model, widest + 1, text_encoder=True)
