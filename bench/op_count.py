"""How many kernels one step asks for, minidb against diffusers: the count of ATen ops each side
dispatches, without a GPU.

    python bench/op_count.py --json bench/results-op-count.json      # under a minute, on the CPU

Why count: on the GPU the eager SDXL step looks bound by its launches rather than its arithmetic. Sampling's
UNet forward took 76 ms eager and 44 ms replayed as a CUDA graph on the H100, and the LoRA step's times
swing by 30% within one process (bench/RESULTS.md). Where that holds, a step's time follows the number
of kernels it launches, and that number is the same on every machine.

Each row is built as bench/rows.py builds the row of that name (the same layers adapted, the same
rank, the frozen base in bf16 or fp32, fp32 adapters, bf16 autocast, 1 instance + 1 class latent,
the prior loss), at the real block structure (SDXL's 2/10/10 transformer depths, SD 1.5's four levels)
with narrow widths (64 channels at the first level), so that it runs in seconds on two cores. A count
does not depend on the widths. Counted: every op but views and host-side bookkeeping, in the forward
(with the loss) and in the backward; AdamW is left out (one foreach update of the same parameters
on both sides).

The CPU's autocast stands in for the GPU's, with one difference made up for: CUDA's autocast runs
LayerNorm and GroupNorm in fp32 (it casts their bf16 input, weight and bias up, and their consumers cast
the fp32 output back down), the CPU's in the dtype they come in. `cuda_norms()` makes the CPU do as CUDA
does, on both sides; --cpu-norms leaves the CPU's way.

The SDXL LoRA rows (a bf16 base) count diffusers twice: with PEFT's adapters in fp32, as minidb's (the
settings the timed rows use), and left in bf16, as diffusers' script trains them under
--mixed_precision bf16 (it casts them to fp32 only under fp16). A count is not a time: ops differ in what they cost the host (a cast
that autocast dispatches costs less than a Python module call), so it says where time may go, and the
GPU says how much.
"""

import argparse
import collections
import dataclasses
import json
import math
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build  # noqa: E402
from bench.rows import LORA_KOHYA, LORA_SDXL, lora_params, sdxl_call  # noqa: E402
from minidb import unet as un  # noqa: E402
from minidb.loop import hold_frozen  # noqa: E402

ROWS = {  # row: (family, minidb's config, adapted layers or None, gradient checkpointing)
    "sdxl-unet": ("SDXL", un.SDXL, None, False),
    "sdxl-lora-step": ("SDXL", un.SDXL, LORA_SDXL, False),
    "sdxl-lora-step-gc": ("SDXL", un.SDXL, LORA_SDXL, True),
    "lora-step": ("SD 1.x", un.SD1, LORA_KOHYA, False),
}
HOST_ONLY = {"_unsafe_view", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense",
             "_record_function_enter_new", "_record_function_exit"}


class Launches(TorchDispatchMode):
    """Counts the ops dispatched under it by name, views and host-only ops left out. A batched
    `_foreach_copy_` (minidb's adapter casts) counts as the kernels CUDA launches for it: one per 64
    tensors (multi_tensor_apply's limit for two lists, each tensor here within one 65536-element chunk)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_foreach_copy_":
            assert all(t.numel() <= 65536 for t in args[0])
            self.ops[name] += math.ceil(len(args[0]) / 64)
        elif not func.is_view and name not in HOST_ONLY:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def cuda_norms():
    """Under the CPU's autocast, F.layer_norm and F.group_norm (which nn.LayerNorm and nn.GroupNorm
    call) run in fp32 on fp32 copies of their lower-precision tensors, as CUDA's autocast runs them."""
    originals = F.layer_norm, F.group_norm

    def in_fp32(norm):
        def run(*args):
            if not torch.is_autocast_enabled("cpu"):
                return norm(*args)
            with torch.autocast("cpu", enabled=False):
                return norm(*[a.float() if torch.is_tensor(a) else a for a in args])  # fp32 stays as it is
        return run
    F.layer_norm, F.group_norm = in_fp32(F.layer_norm), in_fp32(F.group_norm)
    try:
        yield
    finally:
        F.layer_norm, F.group_norm = originals


def step_counts(row, impl, norms="cuda"):
    """{phase: Counter of op names} for one step of `row` on `impl`'s UNet (after one warm-up step).
    norms: whose autocast the norms follow ("cuda" under cuda_norms(), "cpu"), for minidb's hold_frozen.
    impl "diffusers-bf16": diffusers with PEFT's adapters left in bf16, as its scripts train them
    under --mixed_precision bf16 (bench/rows.py lora_params)."""
    family, cfg, targets, checkpointing = ROWS[row]
    impl, peft_fp32 = impl.removesuffix("-bf16"), not impl.endswith("-bf16")
    g = torch.Generator().manual_seed(0)
    sdxl = family == "SDXL"
    base_dtype = torch.bfloat16 if sdxl or targets is None else torch.float32  # as bench/rows.py on a GPU
    unet = build("unet", impl, "cpu", base_dtype, family, dataclasses.replace(cfg, model_channels=64))
    lat = 16
    x, target = torch.randn(2, 4, lat, lat, generator=g), torch.randn(2, 4, lat, lat, generator=g)
    t = torch.tensor([100, 700])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(base_dtype)  # text encoders held in that dtype too
    if sdxl:
        pooled = torch.randn(2, 1280, generator=g).to(base_dtype)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
        call = sdxl_call(unet, impl)
        predict = lambda: call(x, t, ctx, pooled, time_ids)  # noqa: E731
    else:
        predict = (lambda: unet(x, t, ctx).sample) if impl == "diffusers" else (lambda: unet(x, t, ctx))  # noqa: E731
    if targets is None:  # sampling's forward: no autocast, no gradients
        x = x.to(base_dtype)
        with torch.no_grad(), Launches() as forward:
            predict()
        return {"forward": forward.ops}
    unet.train().requires_grad_(False)
    if impl == "minidb" and base_dtype != torch.float32:  # as train.py holds a frozen base
        hold_frozen(unet, base_dtype, norms)
    params = lora_params(unet, impl, targets, family, peft_fp32)
    if checkpointing:
        if impl == "minidb":
            unet.gradient_checkpointing = True
        else:
            unet.enable_gradient_checkpointing()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = predict().float()
        instance, prior = pred.chunk(2)
        return F.mse_loss(instance, target[:1]) + F.mse_loss(prior, target[1:])

    loss().backward()  # warm-up
    for p in params:  # as AdamW's zero_grad(set_to_none=True) leaves them
        p.grad = None
    with Launches() as forward:
        value = loss()
    with Launches() as backward:
        value.backward()
    return {"forward": forward.ops, "backward": backward.ops}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS), help="which (default: all)")
    p.add_argument("--cpu-norms", action="store_true", help="leave LayerNorm and GroupNorm as the CPU's "
                   "autocast runs them (in bf16), rather than in fp32 as CUDA's does")
    p.add_argument("--json", default=None, help="also write the counts here")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {}
    print(f"{'row':<20}{'phase':<10}{'minidb':>8}{'diffusers':>11}{'ratio':>7}  ops that differ (minidb - diffusers)")
    for row in args.rows:
        with nullcontext() if args.cpu_norms else cuda_norms():
            bf16_base = ROWS[row][0] == "SDXL" and ROWS[row][2] is not None  # where PEFT's adapters come in bf16
            impls = ("minidb", "diffusers") + (("diffusers-bf16",) if bf16_base else ())
            counts = {impl: step_counts(row, impl, "cpu" if args.cpu_norms else "cuda") for impl in impls}
        results[row] = {impl: {phase: dict(ops) for phase, ops in c.items()} for impl, c in counts.items()}
        totals = collections.Counter(), collections.Counter()
        for phase in counts["minidb"]:
            ours, theirs = counts["minidb"][phase], counts["diffusers"][phase]
            totals[0].update(ours)
            totals[1].update(theirs)
            differ = {op: ours[op] - theirs[op] for op in sorted(set(ours) | set(theirs)) if ours[op] != theirs[op]}
            n, m = sum(ours.values()), sum(theirs.values())
            print(f"{row:<20}{phase:<10}{n:>8}{m:>11}{n / m:>7.2f}  {differ}")
        n, m = sum(totals[0].values()), sum(totals[1].values())
        results[row]["ratio"] = round(n / m, 3)
        print(f"{row:<20}{'step':<10}{n:>8}{m:>11}{n / m:>7.2f}")
        if "diffusers-bf16" in counts:
            m = sum(sum(ops.values()) for ops in counts["diffusers-bf16"].values())
            results[row]["ratio_to_bf16_adapters"] = round(n / m, 3)
            print(f"{row:<20}{'step':<10}{n:>8}{m:>11}{n / m:>7.2f}  against diffusers with PEFT's adapters in bf16")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "norms": "as the CPU's autocast runs them" if args.cpu_norms
                                          else "in fp32, as CUDA's autocast runs them", "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
