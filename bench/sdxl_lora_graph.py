"""Would the SDXL LoRA step reach issue 13's target (at most 0.8x diffusers' step time) if its UNet
forward and backward were replayed as CUDA graphs, as sampling's UNet is (minidb/graphs.py)?

    python bench/sdxl_lora_graph.py --json $OUT/lora-graph.json      # GPU, 1024 px, about 2 minutes
    python bench/sdxl_lora_graph.py --device cpu --size 64 --runs 1 --variants minidb   # its eager path

The steps, in one process, one after the other (each model freed before the next), as bench/run.py's
sdxl-lora-step row builds them (rank-16 adapters on to_q/k/v/out of a frozen bf16 UNet, fp32 adapters,
bf16 autocast, 1 instance + 1 class latent, prior loss, AdamW):
    diffusers   diffusers' UNet with PEFT's LoRA, eager, its adapters in fp32 as minidb's (equal settings)
    diffusers-bf16  the same with PEFT's adapters in bf16, as diffusers' script trains them under
                --mixed_precision bf16 (it casts them to fp32 only under fp16)
    minidb      minidb's UNet with its LoRA hooks, eager: what train.py runs
    graph       the same, its UNet forward and backward recorded by torch.cuda.make_graphed_callables
                (the loss and AdamW stay eager); the recording's seconds are reported
The evidence for trying it: sampling's eager UNet step is launch-bound on the H100 (76 ms eager, 43 ms
replayed), and the LoRA rows' times spread by 30% within one process (bench/RESULTS.md), as
launch-bound work does. The adapters add about as many kernels again as the UNet has.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build  # noqa: E402
from bench.rows import LORA_SDXL, lora_params, sdxl_conditioning, task, train_step  # noqa: E402
from minidb.unet import size_features  # noqa: E402

VARIANTS = ["diffusers", "diffusers-bf16", "minidb", "graph"]


class UnetWithAdapters(torch.nn.Module):
    """The frozen UNet and its adapters as one module: make_graphed_callables returns the gradients of a
    module's own parameters, and the adapters live in hooks outside the UNet's. Autocast is inside, with
    its weight cache off, as CUDA graphs require."""

    def __init__(self, unet, adapters):
        super().__init__()
        self.unet, self.adapters = unet, torch.nn.ParameterList(adapters)

    def forward(self, x, t, context, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.unet(x, t, context, y).float()


def graphed_step(device, size, g):
    """(the step function, the recording's seconds)."""
    unet = build("unet", "minidb", device, torch.bfloat16, "SDXL").train().requires_grad_(False)
    params = lora_params(unet, "minidb", LORA_SDXL, "SDXL")
    ctx, pooled, time_ids = sdxl_conditioning(g, device, torch.bfloat16)  # as bench/rows.py's row
    y = torch.cat([pooled, size_features(time_ids)], dim=1)
    lat = size // 8
    sample = (torch.randn(2, 4, lat, lat, device=device), torch.tensor([100, 700], device=device), ctx, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graphed = torch.cuda.make_graphed_callables(UnetWithAdapters(unet, params), sample, num_warmup_iters=3)
    torch.cuda.synchronize()
    return train_step(lambda x, t: graphed(x, t, ctx, y), params, 1e-4, device, size, g), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--size", type=int, default=1024, help="image side in px (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS, help="which, in this order")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.runs < 1 or args.size < 8 or args.size % 64:
        p.error("--runs must be at least 1 and --size a multiple of 64.")
    if "graph" in args.variants and args.device != "cuda":
        p.error("the graph variant needs --device cuda.")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            g = torch.Generator().manual_seed(0)
            recording = None
            if variant == "graph":
                step, recording = graphed_step(args.device, args.size, g)
            else:
                step = task("sdxl-lora-step", variant, args.device, args.size, tmp)
            step()
            step()  # warm-ups
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.runs):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            row = {"variant": variant, "seconds": statistics.median(times), "all_seconds": times, "recording_s": recording,
                   "trained": step.trained,
                   "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
            rows.append(row)
            bases = {r["variant"]: r["seconds"] for r in rows if r["variant"].startswith("diffusers")}
            print(f"{variant:14s} {row['seconds'] * 1e3:8.1f} ms"
                  + "".join(f"  {row['seconds'] / s:.3f}x {name}" for name, s in bases.items() if name != variant)
                  + f"  spread {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms"
                  + (f"  peak {row['peak_gpu_gb']:.2f} GB" if row["peak_gpu_gb"] else "")
                  + (f"  recorded in {recording:.1f} s" if recording else ""), flush=True)
            del step
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # after every variant, so a run cut short keeps what it measured
                name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
                Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "size": args.size,
                                                       "runs": args.runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
