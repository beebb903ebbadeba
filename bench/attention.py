"""Attention speed on the GPU: minidb's Triton FlashAttention kernel against PyTorch's
scaled_dot_product_attention with its flash and memory-efficient backends, same run, SD's shapes.

    python bench/attention.py [--dtypes bf16 fp16] [--reps 30] [--out bench/attention.json]

Shapes: batch 2 (one image, classifier-free guidance doubles it) at 512 px, i.e. 64x64 latents.
SD 1: 8 heads, head dims 40 / 80 / 160 at 4096 / 1024 / 256 tokens. SD 2: head dim 64 with 5 / 10 / 20
heads. Each as self-attention and as cross-attention to the 77 text tokens.

FLOPs, FlashAttention's convention: forward 4·B·H·Lq·Lk·D (q kᵀ and P v, 2 FLOPs per multiply-add),
backward 2.5x the forward (five such products instead of two), so forward+backward is 3.5x. D is the
model's head dim, unpadded: work the kernel wastes on padding (40 -> 64) lowers its TFLOP/s.
Times: CUDA events around each call, median of --reps calls after warm-up (the first calls compile).
"speedup" = SDPA-flash time / Triton time (> 1: ours is faster). Errors: largest |ours - float64| over
the output (fwd) or over dq, dk, dv (bwd), relative to the largest |float64| entry of that tensor.
"""

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: minidb importable

SHAPES = [  # (name, B, H, Lq, Lk, D)
    ("SD1 L0 self", 2, 8, 4096, 4096, 40), ("SD1 L0 cross", 2, 8, 4096, 77, 40),
    ("SD1 L1 self", 2, 8, 1024, 1024, 80), ("SD1 L1 cross", 2, 8, 1024, 77, 80),
    ("SD1 L2 self", 2, 8, 256, 256, 160), ("SD1 L2 cross", 2, 8, 256, 77, 160),
    ("SD2 L0 self", 2, 5, 4096, 4096, 64), ("SD2 L0 cross", 2, 5, 4096, 77, 64),
    ("SD2 L1 self", 2, 10, 1024, 1024, 64), ("SD2 L1 cross", 2, 10, 1024, 77, 64),
    ("SD2 L2 self", 2, 20, 256, 256, 64), ("SD2 L2 cross", 2, 20, 256, 77, 64),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):  # only this backend: an error rather than a silent fallback
            return F.scaled_dot_product_attention(q, k, v)
    return run


def median_ms(fn, reps):
    for _ in range(3):  # warm-up: Triton compiles, cuDNN/cuBLAS pick algorithms
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(ours, exact):
    return ((ours.double() - exact).abs().max() / exact.abs().max()).item()


def measure(fn, q, k, v, do, exact, reps):
    """-> forward ms, forward+backward ms, forward error, largest gradient error (None if unsupported)."""
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    try:
        out = fn(qg, kg, vg)
        grads = torch.autograd.grad(out, (qg, kg, vg), do)
    except RuntimeError as e:  # e.g. a backend that does not take this head dim
        print(f"    skipped: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None, None, None, None
    errs = (rel_err(out, exact[0]), max(rel_err(g, e) for g, e in zip(grads, exact[1:])))
    with torch.no_grad():
        fwd = median_ms(lambda: fn(q, k, v), reps)
    both = median_ms(lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do), reps)
    return fwd, both, *errs


def float64_reference(q, k, v, do):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.double()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement (the median is reported)")
    parser.add_argument("--out", default="bench/attention.json", help="where to write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py times GPU kernels and needs a CUDA GPU; none is visible here.")
    try:
        import triton
    except ImportError:
        sys.exit("bench/attention.py needs the triton package (pip install triton).")
    from torch.nn.attention import SDPBackend

    from minidb.flash_attention import flash_attention

    backends = {"triton": flash_attention, "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
                "sdpa-efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION)}
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "reps": args.reps,
            "flops": "fwd 4*B*H*Lq*Lk*D (unpadded D), bwd 2.5x fwd, fwd+bwd 3.5x fwd"}
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}; median of {args.reps} calls\n")
    rows = []
    for dtype_name in args.dtypes:
        for name, b, h, lq, lk, d in SHAPES:
            g = torch.Generator("cuda").manual_seed(0)
            q, k, v, do = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=DTYPES[dtype_name])
                           for n in (lq, lk, lk, lq))
            exact = float64_reference(q, k, v, do)
            flops = 4 * b * h * lq * lk * d
            row = {"shape": name, "B": b, "H": h, "Lq": lq, "Lk": lk, "D": d, "dtype": dtype_name}
            for backend, fn in backends.items():
                fwd, both, err_fwd, err_bwd = measure(fn, q, k, v, do, exact, args.reps)
                row[backend] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "err_fwd": err_fwd, "err_bwd": err_bwd,
                                "fwd_tflops": fwd and flops / fwd / 1e9,  # FLOP / ms / 1e9 = TFLOP/s
                                "fwd_bwd_tflops": both and 3.5 * flops / both / 1e9}
            del exact
            rows.append(row)
            print(f"  {dtype_name} {name}: done", file=sys.stderr)

    def cell(row, backend, key):
        x = row[backend][key]
        if x is None:
            return "n/a"
        return f"{x:.3f}" if key.endswith("ms") else f"{x:.3g}" if "tflops" in key else f"{x:.1e}"

    def ratio(row, key):
        t, f = row["triton"][key], row["sdpa-flash"][key]
        return "n/a" if t is None or f is None else f"{f / t:.2f}x"

    for part, ms, tf in (("forward", "fwd_ms", "fwd_tflops"), ("forward+backward", "fwd_bwd_ms", "fwd_bwd_tflops")):
        print(f"\n### {part}: ms (TFLOP/s)\n")
        print("| shape | B×H, Lq, Lk, D | dtype | triton | sdpa-flash | sdpa-efficient | speedup vs flash "
              "| err triton | err flash |\n|---|---|---|---|---|---|---|---|---|")
        err = "err_fwd" if part == "forward" else "err_bwd"
        for r in rows:
            timings = [f"{cell(r, be, ms)} ({cell(r, be, tf)})" for be in backends]
            print(f"| {r['shape']} | {r['B']}×{r['H']}, {r['Lq']}, {r['Lk']}, {r['D']} | {r['dtype']} | "
                  f"{' | '.join(timings)} | {ratio(r, ms)} | {cell(r, 'triton', err)} | {cell(r, 'sdpa-flash', err)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
