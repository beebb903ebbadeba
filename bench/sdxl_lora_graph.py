"""Would the SDXL LoRA step reach issue 13's target (at most 0.8x diffusers' step time) if its UNet
forward and backward were replayed as CUDA graphs, as sampling's UNet is (minidb/graphs.py)?

    python bench/sdxl_lora_graph.py --json $OUT/lora-graph.json      # GPU, 1024 px, about 2 minutes
    python bench/sdxl_lora_graph.py --device cpu --size 64 --channels 64 --runs 3 \
        --variants diffusers diffusers-bf16 minidb                      # its eager paths, narrow, on the CPU

The variants live side by side in one process (four SDXL UNets in bf16 take about 21 GB of the GPU) and
are timed in turns: each round runs one step of every variant, each round starting one variant further
along. The eager LoRA steps' times drifted by 30% within a process (bench/RESULTS.md); in turns, a drift
slows every variant alike, and the median of the rounds' ratios cancels it. Each step is built as
bench/run.py's sdxl-lora-step row builds it (rank-16 adapters on to_q/k/v/out of a frozen bf16 UNet,
fp32 adapters, bf16 autocast, 1 instance + 1 class latent, prior loss, AdamW):
    diffusers   diffusers' UNet with PEFT's LoRA, eager, its adapters in fp32 as minidb's (equal settings)
    diffusers-bf16  the same with PEFT's adapters in bf16, as diffusers' script trains them under
                --mixed_precision bf16 (it casts them to fp32 only under fp16)
    minidb      minidb's UNet with its LoRA hooks, eager: what train.py runs
    graph       the same, its UNet forward and backward replayed as CUDA graphs, as train.py runs it on
                a GPU (minidb/graphs.py TrainingGraph; the loss and AdamW stay eager); the seconds of the
                first step, which records, are reported
Besides the time, each row gives the time until step() returned, before the GPU is waited for: where it is
well below the time, the host ran ahead and the GPU's arithmetic bounds the step; where it is about the
time, either the GPU waited for launches, or the launch queue was full (the graph variant tells them apart).
The peak is the variant's own: the memory it holds (reserved, so that a graph's private pool counts) plus
its steps' highest use above that.
The evidence for trying it: sampling's eager UNet step is launch-bound on the H100 (76 ms eager, 43 ms
replayed), and the LoRA rows' times spread by 30% within one process (bench/RESULTS.md), as
launch-bound work does. The adapters add about as many kernels again as the UNet has.
"""

import argparse
import dataclasses
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
from minidb import unet as un  # noqa: E402
from minidb.graphs import TrainingGraph  # noqa: E402
from minidb.loop import hold_frozen  # noqa: E402

VARIANTS = ["diffusers", "diffusers-bf16", "minidb", "graph"]


def graphed_step(device, size, g, cfg=None):
    """(the step function, the recording's seconds): minidb's step with its UNet forward and backward
    replayed as CUDA graphs, by minidb/graphs.py's TrainingGraph, as train.py runs it."""
    unet = build("unet", "minidb", device, torch.bfloat16, "SDXL", cfg).train().requires_grad_(False)
    hold_frozen(unet, torch.bfloat16, device)  # as train.py holds it (bench/rows.py's minidb row too)
    loras = []
    params = lora_params(unet, "minidb", LORA_SDXL, "SDXL", loras=loras)
    ctx, pooled, time_ids = sdxl_conditioning(g, device, torch.bfloat16)  # as bench/rows.py's row
    graph = TrainingGraph(unet, params, torch.bfloat16, forget=loras[0].drop_casts)
    step = train_step(lambda x, t: graph(x, t, ctx, torch.cat([pooled, un.size_features(time_ids)], dim=1)),
                      params, 1e-4, device, size, g)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()  # the first step records
    torch.cuda.synchronize()
    return step, time.perf_counter() - t0


def timed(step, sync, cuda):
    """(seconds, seconds until step() returned, the step's own peak GPU bytes above what was held before)."""
    sync()
    held = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    host = time.perf_counter() - t0
    sync()
    return time.perf_counter() - t0, host, (torch.cuda.max_memory_allocated() - held if cuda else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--size", type=int, default=1024, help="image side in px (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="rounds; each times one step of every variant (default: %(default)s)")
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS, help="which (default: all)")
    p.add_argument("--channels", type=int, default=un.SDXL.model_channels,
                   help="the UNet's first-level width; narrower than SDXL's %(default)s only to try the script on the CPU")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.runs < 1 or args.size < 8 or args.size % 64 or args.channels < 32 or args.channels % 32:
        p.error("--runs must be at least 1, --size a multiple of 64 and --channels a multiple of 32.")
    if "graph" in args.variants and args.device != "cuda":
        p.error("the graph variant needs --device cuda.")
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = dataclasses.replace(un.SDXL, model_channels=args.channels)
    steps, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:  # all built first, then timed in turns
            g = torch.Generator().manual_seed(0)
            sync()
            if cuda:
                torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved() if cuda else 0
            recording = None
            if variant == "graph":
                steps[variant], recording = graphed_step(args.device, args.size, g, cfg)
            else:
                steps[variant] = task("sdxl-lora-step", variant, args.device, args.size, tmp, cfg)
            for _ in range(2):  # warm-ups
                steps[variant]()
            sync()
            if cuda:  # what the variant holds: weights, adapters, AdamW's state, a graph's private pool
                torch.cuda.empty_cache()  # (reserved, not allocated: between replays no tensor holds the pool)
            rows[variant] = {"variant": variant, "recording_s": recording, "trained": steps[variant].trained,
                             "held_gb": ((torch.cuda.memory_reserved() - before) / 2**30) if cuda else None,
                             "all_seconds": [], "all_host_seconds": [], "step_gb": 0.0}
            print(f"built {variant}" + (f", recorded in {recording:.1f} s" if recording else ""), flush=True)
        for i in range(args.runs):
            order = args.variants[i % len(args.variants):] + args.variants[:i % len(args.variants)]
            for variant in order:  # each round starts one further along, so no variant always follows another
                seconds, host, peak = timed(steps[variant], sync, cuda)
                row = rows[variant]
                row["all_seconds"].append(seconds)
                row["all_host_seconds"].append(host)
                row["step_gb"] = max(row["step_gb"], peak / 2**30)
            summarize(rows, cuda)
            if args.json:  # after every round, so a run cut short keeps what it measured
                name = torch.cuda.get_device_name() if cuda else "cpu"
                Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "size": args.size,
                                                       "channels": args.channels, "rounds": i + 1,
                                                       "rows": list(rows.values())}, indent=1) + "\n")
    for variant, row in rows.items():
        times = row["all_seconds"]
        print(f"{variant:14s} {row['seconds'] * 1e3:8.1f} ms (host {row['host_seconds'] * 1e3:.0f} ms)"
              + "".join(f"  {r['of_medians']:.3f}x {base} ({r['median_of_rounds']:.3f}x by rounds)"
                        for base, r in row["ratios"].items())
              + f"  spread {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms"
              + (f"  peak {row['peak_gpu_gb']:.2f} GB" if cuda else ""), flush=True)


def summarize(rows, cuda):
    """Each row's medians, own peak, and its ratios against each diffusers variant: the ratio of the
    medians, and the median of the rounds' ratios (a drift that slows a whole round cancels out of it)."""
    for row in rows.values():
        row["seconds"], row["host_seconds"] = statistics.median(row["all_seconds"]), statistics.median(row["all_host_seconds"])
        if cuda:
            row["peak_gpu_gb"] = row["held_gb"] + row["step_gb"]  # what it would peak at alone
    for variant, row in rows.items():
        row["ratios"] = {base: {"of_medians": row["seconds"] / rows[base]["seconds"],
                                "median_of_rounds": statistics.median(a / b for a, b in zip(row["all_seconds"],
                                                                                             rows[base]["all_seconds"]))}
                         for base in rows if base.startswith("diffusers") and base != variant}


if __name__ == "__main__":
    main()
