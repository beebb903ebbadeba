"""SDXL's UNet forward as sampling repeats it (batch 2 for guidance, 1024 px, fp16) in several forms,
in one process, to see what could bring sampling to issue 13's target of 1.3x diffusers' speed.

    python bench/sdxl_unet_variants.py --json $OUT/variants.json           # GPU, SDXL's real sizes
    python bench/sdxl_unet_variants.py --device cpu --size 8 --runs 1      # its path, on the CPU

The variants, in this order (the costly compile last, so a run cut short keeps the figures before it):
    diffusers       diffusers' UNet2DConditionModel, eager: the reference
    minidb          minidb's UNet, eager: what sample.py runs
    channels_last   minidb's UNet with its weights and input in channels-last layout
    cuda_graph      minidb's UNet replayed as a CUDA graph, as sample.py does on a GPU (minidb/graphs.py)
    compile         torch.compile(minidb's UNet), default mode; the compile's seconds are reported
Each: the median of --runs timed forwards after a warm-up, and its largest difference from the
diffusers output (identical weights, bench/models.py). Each line is printed as soon as it is measured.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build  # noqa: E402
from bench.rows import sdxl_call, sdxl_conditioning  # noqa: E402
from minidb.graphs import UnetGraph  # noqa: E402

VARIANTS = ["diffusers", "minidb", "channels_last", "cuda_graph", "compile"]


def timed(fn, runs, sync):
    """(the first call's seconds, the median of `runs` calls after it, the last output)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    fn()  # a second warm-up: cuDNN's algorithm search and the allocator settle on the first two
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="latent side; 128 is 1024 px (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="timed forwards per variant (default: %(default)s)")
    p.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS, help="which, in this order")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.runs < 1 or args.size < 1 or args.size % 8:
        p.error("--runs must be at least 1 and --size a positive multiple of 8.")
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.bfloat16  # bf16 on the CPU: two 2.6 B UNets fit in RAM
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size, args.size, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    ctx, pooled, time_ids = sdxl_conditioning(g, device, dtype)
    rows, reference, unet = [], None, None
    for variant in args.variants:
        if variant == "diffusers":
            model = build("unet", "diffusers", device, dtype, "SDXL")
            fn = sdxl_call(model, "diffusers")
        else:
            unet = unet or build("unet", "minidb", device, dtype, "SDXL")
            inp = x
            if variant == "channels_last":
                unet = unet.to(memory_format=torch.channels_last)
                inp = x.contiguous(memory_format=torch.channels_last)
            else:
                unet = unet.to(memory_format=torch.contiguous_format)
            model = {"compile": lambda: torch.compile(unet), "cuda_graph": lambda: UnetGraph(unet)}.get(variant, lambda: unet)()
            fn = sdxl_call(model, "minidb")
        with torch.no_grad():
            first, median, out = timed(lambda: fn(inp if variant != "diffusers" else x, t, ctx, pooled, time_ids),
                                       args.runs, sync)
        out = out.float()
        if variant == "diffusers":
            reference = out
            del model, fn  # one UNet at a time in memory
        error = float((out - reference).abs().max()) if reference is not None else None
        row = {"variant": variant, "seconds": median, "first_call_s": first, "max_abs_diff_vs_diffusers": error,
               "scale": float(out.abs().max())}
        rows.append(row)
        base = rows[0]["seconds"] if rows[0]["variant"] == "diffusers" else None
        ratio = f"x{median / base:.3f} diffusers' time" if base else ""
        print(f"{variant:14s} {median * 1e3:8.2f} ms  {ratio:22s} first call {first:6.1f} s  "
              f"max |diff| {error if error is None else f'{error:.2e}'} (outputs up to {row['scale']:.2f})", flush=True)
        if args.json:  # after every variant, so a run cut short keeps what it measured
            name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": str(dtype),
                                                   "latent": args.size, "runs": args.runs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
