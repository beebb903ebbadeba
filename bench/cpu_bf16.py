"""The CPU's native bf16: minidb's CPU default against diffusers' default and against diffusers under
the same autocast, as ratios from one run (issue 16).

    python bench/cpu_bf16.py                       # every row, 2 threads
    python bench/cpu_bf16.py --rows unet-32        # some rows
    python bench/cpu_bf16.py --compile             # also minidb's UNet under torch.compile
    python bench/cpu_bf16.py --rounds 5            # each implementation 5 times, interleaved: the noise
    python bench/cpu_bf16.py --quality             # bf16 against fp32 pictures, SD-shaped random weights

Implementations, each (row, implementation) in a fresh process with bench/run.py's identical random
SD 1.5-shaped weights:
  minidb+bf16      minidb's default on a CPU with native bf16: bf16 autocast, and for inference the
                   convolution and linear weights held in bf16 (sample.py; train.py keeps fp32 master
                   weights, so its step is autocast alone)
  minidb           minidb with --dtype fp32 / --mixed-precision no: the exact, diffusers-equal path
  diffusers        diffusers' default on the CPU: fp32
  diffusers+bf16   diffusers with its whole call under the same torch.autocast("cpu", torch.bfloat16)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import build  # noqa: E402
from bench.rows import ROWS, TRAINING, task  # noqa: E402
from bench.run import machine  # noqa: E402

BF16_ROWS = ["unet-32", "unet-64", "train-step", "vae-decode-256", "sample"]
IMPLS = ["minidb+bf16", "minidb", "diffusers", "diffusers+bf16"]


def minidb_sampler(size, compiled=False):
    """sample.py's CPU default: bf16 autocast over encoding, denoising and decoding, bf16 conv/linear weights."""
    import torch
    from minidb.load import StableDiffusion
    from minidb.pipeline import bf16_for_autocast, decode, sample_latents
    from minidb.tokenizer import Tokenizer
    parts = {p: bf16_for_autocast(build(p, "minidb", "cpu", torch.float32)) for p in ("unet", "vae", "text")}
    model = StableDiffusion(Tokenizer.for_version("SD 1.x"), parts["text"], parts["vae"], parts["unet"], "SD 1.x",
                            "epsilon")
    if compiled:
        model.unet = torch.compile(model.unet)

    def run(steps=50):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents = sample_latents(model, "a photo of sks dog on the beach", steps=steps, guidance=7.5, seed=0,
                                     height=size, width=size, progress=False)
            return decode(model, latents)
    return run


def worker(row, impl, threads, tmp):
    import torch
    import diffusers  # noqa: F401  every implementation pays for the same imports
    torch.set_num_threads(threads)
    torch.set_grad_enabled(row in TRAINING)
    base, *modes = impl.split("+")
    _, size, _, runs, _ = ROWS[row]
    t0 = time.perf_counter()
    if row == "sample" and base == "minidb" and "bf16" in modes:
        fn = minidb_sampler(size, "compile" in modes)
    else:
        if base == "minidb" and "bf16" in modes and row not in TRAINING:  # inference: bf16 conv/linear weights
            import bench.rows  # task() builds its parts through bench.rows.build
            from minidb.pipeline import bf16_for_autocast
            plain = bench.rows.build
            bench.rows.build = lambda *a, **k: bf16_for_autocast(plain(*a, **k))
        fn = task(row, base, "cpu", size, tmp)
        if "compile" in modes:
            raise SystemExit("--compile is measured on the sample row only")
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in modes and row != "sample" or \
        base == "diffusers" and "bf16" in modes else nullcontext()
    if row == "sample":
        fn(steps=2)  # warm-up (and, compiled, the compilation)
    else:
        with amp:
            fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        with amp:
            fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "setup_and_warmup_s": warm}


def quality(threads):
    """Pictures of an SD-shaped random-weight model, bf16 autocast against fp32, same seed: the mean
    and largest pixel difference (0-255), for the UNet alone and with the VAE decoding in bf16 too."""
    import numpy as np
    import torch
    from minidb.load import StableDiffusion
    from minidb.pipeline import decode, sample_latents
    from minidb.tokenizer import Tokenizer
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    parts = {p: build(p, "minidb", "cpu", torch.float32) for p in ("unet", "vae", "text")}
    model = StableDiffusion(Tokenizer.for_version("SD 1.x"), parts["text"], parts["vae"], parts["unet"], "SD 1.x",
                            "epsilon")
    draw = lambda: sample_latents(model, "a photo of sks dog on the beach", steps=20, guidance=7.5, seed=0,
                                  height=256, width=256, progress=False)
    exact = draw()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = draw()
        decoded_bf16 = np.asarray(decode(model, fast)[0], dtype=np.float64)
    pictures = {name: np.asarray(decode(model, z)[0], dtype=np.float64) for name, z in (("fp32", exact), ("bf16", fast))}
    diff = lambda a, b: {"mean": float(np.abs(a - b).mean()), "max": float(np.abs(a - b).max())}
    return {"latent_rel_diff": float((fast - exact).norm() / exact.norm()),
            "unet_bf16_vae_fp32": diff(pictures["bf16"], pictures["fp32"]),
            "unet_bf16_vae_bf16": diff(decoded_bf16, pictures["fp32"]),
            "vae_bf16_vs_fp32_same_latents": diff(decoded_bf16, pictures["bf16"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=BF16_ROWS, choices=BF16_ROWS + ["vae-decode-512"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--compile", action="store_true", help="also time minidb's default with a torch.compile'd UNet")
    p.add_argument("--rounds", type=int, default=1, help="time every implementation this many times, in turn; "
                   "the medians pool all rounds and the per-round ratios show the noise (default: 1)")
    p.add_argument("--quality", action="store_true", help="only the bf16-against-fp32 picture difference")
    p.add_argument("--json", default=str(ROOT / "bench" / "results-cpu-bf16.json"), help="where to write the figures")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # ROW IMPL TMP: internal
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be 1 or more, not {args.rounds}")
    if args.worker:
        print(json.dumps(worker(*args.worker[:2], args.threads, args.worker[2])))
        return
    if args.quality:
        print(json.dumps(quality(args.threads), indent=2))
        return
    import tempfile
    import torch
    from minidb.cli import cpu_bf16
    impls = IMPLS + (["minidb+bf16+compile"] if args.compile else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            rounds = []  # each round times every implementation once, in turn, so slow spells hit them alike
            for _ in range(args.rounds):
                figures = {}
                for impl in impls:
                    if impl.endswith("compile") and row != "sample":
                        continue
                    r = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker", row, impl,
                                        tmp], capture_output=True, text=True)
                    if r.returncode:
                        sys.exit(f"error: {row} / {impl} failed:\n{r.stderr[-3000:]}")
                    figures[impl] = json.loads(r.stdout.strip().splitlines()[-1])
                rounds.append(figures)
            med = {impl: statistics.median(s for f in rounds for s in f[impl]["seconds"]) for impl in rounds[0]}
            per_round = lambda ref: [statistics.median(f[ref]["seconds"]) / statistics.median(f["minidb+bf16"]["seconds"])
                                     for f in rounds]  # the ratio within each round: its spread is the noise
            row_result = {"row": row, "what": ROWS[row][0], "size": ROWS[row][1], "median_s": med,
                          "setup_and_warmup_s": {i: rounds[0][i]["setup_and_warmup_s"] for i in rounds[0]},
                          "speedup_vs_diffusers_default": med["diffusers"] / med["minidb+bf16"],
                          "speedup_vs_diffusers_bf16": med["diffusers+bf16"] / med["minidb+bf16"],
                          "bf16_speedup_minidb": med["minidb"] / med["minidb+bf16"],
                          "rounds": len(rounds), "per_round_vs_diffusers_default": per_round("diffusers"),
                          "per_round_vs_diffusers_bf16": per_round("diffusers+bf16")}
            results.append(row_result)
            spread = lambda xs: f" (rounds {min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else ""
            print(f"{row:15s} " + " | ".join(f"{i} {s:.3f}s" for i, s in med.items())
                  + f" | x{row_result['speedup_vs_diffusers_default']:.2f}"
                  f"{spread(row_result['per_round_vs_diffusers_default'])} vs diffusers default, "
                  f"x{row_result['speedup_vs_diffusers_bf16']:.2f}{spread(row_result['per_round_vs_diffusers_bf16'])} "
                  "vs diffusers+bf16", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine("cpu"), "torch": torch.__version__,
            "threads": args.threads, "rounds": args.rounds, "native_bf16": cpu_bf16()}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['date']}, native bf16: {meta['native_bf16']}\n")
    print("| row | size | minidb default (bf16) s | minidb fp32 s | diffusers default (fp32) s | diffusers bf16 s | "
          "vs diffusers default | vs diffusers bf16 |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        print(f"| {r['what']} | {r['size']} | {m['minidb+bf16']:.3f} | {m['minidb']:.3f} | {m['diffusers']:.3f} | "
              f"{m['diffusers+bf16']:.3f} | {r['speedup_vs_diffusers_default']:.2f}x | {r['speedup_vs_diffusers_bf16']:.2f}x |")


if __name__ == "__main__":
    main()
