"""Shared helpers: build the reference models (diffusers, transformers) and minidb's twins with the
same random weights. Everything is created here; nothing is read from outside the repository."""

import dataclasses
import os
import random
import signal

import numpy as np
import pytest
import torch

# Triton kernels run on the CPU only in Triton's interpreter, which must be switched on before any
# @triton.jit function is defined, ours and Triton's own library ones. Importing diffusers below
# imports triton (through torch._dynamo), so this has to come first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from minidb import text_encoder as te, unet as un, vae as va
from minidb.convert import (native_to_diffusers_names, text_config_to_transformers, unet_blocks,
                            unet_config_to_diffusers, vae_attention_shape, vae_blocks, vae_config_to_diffusers)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# Tiny configs shaped like the two real families: SD 1 (fixed head count, conv projections,
# OpenAI CLIP with quick_gelu) and SD 2 (fixed head dim, Linear projections, upcast attention,
# OpenCLIP with gelu). Same tensors names and code paths as the real ones, a few MB in size.
TINY_UNET = {"SD 1.x": un.TINY,
             "SD 2.x": dataclasses.replace(un.TINY, num_heads=0, head_dim=16, linear_proj=True, upcast_attention=True)}
TINY_TEXT = {"SD 1.x": te.TINY, "SD 2.x": dataclasses.replace(te.TINY, activation="gelu")}


def tiny_model():
    """A tiny SD 1.x-style minidb model with PyTorch's default random init (seeded), for the tests of
    files and command lines, where what matters is that the numbers are not all zero."""
    from minidb.load import StableDiffusion
    from minidb.tokenizer import Tokenizer
    torch.manual_seed(0)
    return StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(te.TINY), va.AutoencoderKL(va.TINY),
                           un.UNet(un.TINY), "SD 1.x", "epsilon")


def randomize_(module, seed=0):
    """Random weights everywhere, including layers the reference initializes to zero or one, so
    that a wrong wire cannot hide behind a zero. Uniform in ±1/√fan_in (PyTorch's default scale)
    keeps activations sane at any depth; norm weights stay around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            bound = p[0].numel() ** -0.5 if p.ndim > 1 else 0.2
            p.uniform_(-bound, bound, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module.eval()


def diffusers_unet(cfg, seed=0):
    kwargs = unet_config_to_diffusers(cfg)
    kwargs.pop("_class_name")
    return randomize_(diffusers.UNet2DConditionModel(**kwargs), seed)


def diffusers_vae(cfg, seed=1):
    kwargs = vae_config_to_diffusers(cfg, sample_size=64)
    kwargs.pop("_class_name")
    return randomize_(diffusers.AutoencoderKL(**kwargs), seed)


def transformers_text_encoder(cfg, seed=2):
    kwargs = {k: v for k, v in text_config_to_transformers(cfg).items() if k not in ("architectures", "model_type")}
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)), seed)


def twin(module_cls, cfg, ref_state, blocks=None, vae=False):
    """minidb's module sharing the reference's tensors (renamed, not copied)."""
    with torch.device("meta"):
        module = module_cls(cfg)
    names = native_to_diffusers_names(module.state_dict().keys(), blocks) if blocks else {k: k for k in module.state_dict()}
    state = {k: ref_state[d] for k, d in names.items()}
    if vae:
        state = {k: vae_attention_shape(k, t, to_diffusers=False) for k, t in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def unet_twin(ref, cfg):
    return twin(un.UNet, cfg, ref.state_dict(), unet_blocks(cfg))


def vae_twin(ref, cfg):
    return twin(va.AutoencoderKL, cfg, ref.state_dict(), vae_blocks(cfg), vae=True)


def text_twin(ref, cfg):
    return twin(te.TextEncoder, cfg, ref.state_dict())


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    """fp32 parity: relative to the output's scale, tight enough to catch a wrong constant."""
    scale = b.abs().max().item()
    assert scale > 1e-3, "reference output is ~0: the comparison would prove nothing"
    err = (a - b).abs().max().item()
    assert err <= atol * scale + rtol * scale, f"max abs error {err:.3g} at output scale {scale:.3g}"


def _global_state():
    environment = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {"environment": environment, "default dtype": torch.get_default_dtype(),
            "grad enabled": torch.is_grad_enabled(), "threads": torch.get_num_threads(), "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            # train.py's loop takes Ctrl-C and SIGTERM (minidb/cli.py FinishTheStep) and must give them back
            "SIGINT handler": signal.getsignal(signal.SIGINT), "SIGTERM handler": signal.getsignal(signal.SIGTERM)}


@pytest.fixture(scope="session", autouse=True)
def test_run_environment(tmp_path_factory):
    """Two settings for the whole run, undone at its end:
    - train.py's default --class-cache lies under $XDG_CACHE_HOME: point it at a folder of the run's own, so
      that the tests neither fill the user's ~/.cache nor read what earlier runs left there;
    - under pytest-xdist (pytest.ini runs two workers), each worker and the scripts it starts compute on one
      thread. Most tests are small and single-threaded, so two workers take half the time; with torch's
      default of a thread per core in each, they fought over the cores and took longer than one worker."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        if os.environ.get("PYTEST_XDIST_WORKER"):
            patch.setenv("OMP_NUM_THREADS", "1")
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def global_state_is_restored():
    """Every test leaves the environment variables, torch's global switches and the signal handlers as it
    found them, so a test that leaks state (say MINIDB_ATTENTION=triton) fails itself instead of tests after it.
    The random states (torch's, numpy's and Python's) are put back without a word: many tests seed them on
    purpose, and a test's unseeded inputs are then the same whichever tests ran before it."""
    before = _global_state()
    random_states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.random.set_rng_state(random_states[0])
    np.random.set_state(random_states[1])
    random.setstate(random_states[2])
    after = _global_state()
    if after != before:  # put it back, so that only this test fails
        os.environ.clear()
        os.environ.update(before["environment"])
        torch.set_default_dtype(before["default dtype"])
        torch.set_grad_enabled(before["grad enabled"])
        torch.set_num_threads(before["threads"])
        torch.backends.cudnn.allow_tf32 = before["cudnn.allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = before["cuda.matmul.allow_tf32"]
        signal.signal(signal.SIGINT, before["SIGINT handler"])
        signal.signal(signal.SIGTERM, before["SIGTERM handler"])
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if "environment" in changed:
        old, new = changed.pop("environment")
        changed.update({f"${k}": (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)})
    assert not changed, f"the test changed global state and left it so (before, after): {changed}"
