"""minidb against diffusers, side by side: time and memory of every stage, as ratios from one run.

    python bench/run.py                  # CPU, fp32, 2 threads: sizes that fit in about 10 minutes
    python bench/run.py --device cuda    # GPU, bf16, Stable Diffusion's real sizes
    python bench/run.py --rows unet-64   # only some rows
    python bench/run.py --rows sdxl      # the SDXL rows (asked for by name: 10 GB of fp32 UNet on the CPU)
    python bench/cpu_bf16.py             # CPU: these rows in minidb's bf16 default against diffusers' fp32
                                         # and its bf16 (four implementations a row; a file of its own)

Both implementations get identical random SD 1.5-shaped weights (SDXL rows: SDXL-shaped, with the
2.6 B-parameter UNet): minidb's modules are filled, then the same tensors are renamed into diffusers'
modules. Every (row, implementation) pair runs in a fresh process, so each peak memory figure is its own: peak RSS on the CPU, peak allocated on the
GPU. Both processes import the same libraries, so the baseline is the same. Each time is the median
of several runs after one warm-up. On a shared, noisy machine only the ratio minidb / diffusers of
one run means anything.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import LOAD_FILES, prepare_load_files  # noqa: E402
from bench.rows import ROWS, SDXL_ROWS, SDXL_STEPS, worker  # noqa: E402  (what each row measures, and how)


# ---- the driver ----

def machine(device):
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def run_row(row, device, threads, tmp, runs=None):
    """Both implementations, each in its own process -> the row's figures."""
    figures = {}
    for impl in ("minidb", "diffusers"):
        r = subprocess.run([sys.executable, __file__, "--device", device, "--threads", str(threads),
                            *(["--runs", str(runs)] if runs else []), "--worker", row, impl, tmp],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {row} / {impl} failed:\n{r.stderr[-3000:]}")
        figures[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    m, d = figures["minidb"], figures["diffusers"]
    if m["trained"] != d["trained"]:
        sys.exit(f"error: {row}: minidb trains {m['trained']} parameters, diffusers {d['trained']}; not the same layers.")
    if m["checksum"] is not None and not math.isclose(m["checksum"], d["checksum"], rel_tol=1e-6):
        sys.exit(f"error: {row}: the weights minidb and diffusers loaded differ (sums {m['checksum']}, {d['checksum']}).")
    med = {k: statistics.median(v["seconds"]) for k, v in figures.items()}
    mem = "peak_gpu_gb" if device == "cuda" else "peak_rss_gb"
    r = {"row": row, "what": ROWS[row][0], "size": ROWS[row][2 if device == "cuda" else 1],
         "baseline_rss_gb": {"minidb": m["baseline_rss_gb"], "diffusers": d["baseline_rss_gb"]},
         "peak_rss_gb": {"minidb": m["peak_rss_gb"], "diffusers": d["peak_rss_gb"]},
         "minidb_s": med["minidb"], "diffusers_s": med["diffusers"],
         "time_ratio": med["minidb"] / med["diffusers"], "minidb_mem_gb": m[mem],
         "diffusers_mem_gb": d[mem], "mem_ratio": m[mem] / d[mem], "runs": len(m["seconds"]),
         "all_seconds": {"minidb": m["seconds"], "diffusers": d["seconds"]}}
    if device == "cuda":
        r["peak_gpu_reserved_gb"] = {"minidb": m["peak_gpu_reserved_gb"], "diffusers": d["peak_gpu_reserved_gb"]}
    if m["trained"]:
        r["trained_params"] = m["trained"]
    if m["phases"]:  # sampling: steps per second of the denoising loop alone, and the decode's seconds
        for impl, f in figures.items():
            denoise = statistics.median(p["denoise"] for p in f["phases"])
            r[f"{impl}_it_per_s"] = SDXL_STEPS / denoise
            r[f"{impl}_decode_s"] = statistics.median(p["decode"] for p in f["phases"])
    print(f"{row:17s} minidb {r['minidb_s']:8.3f}s {r['minidb_mem_gb']:6.2f}GB | diffusers {r['diffusers_s']:8.3f}s "
          f"{r['diffusers_mem_gb']:6.2f}GB | time x{r['time_ratio']:.2f} mem x{r['mem_ratio']:.2f}", flush=True)
    if device == "cuda":
        print(f"{'':17s} peak reserved by PyTorch's allocator: {m['peak_gpu_reserved_gb']:.2f} GB vs "
              f"{d['peak_gpu_reserved_gb']:.2f} GB", flush=True)
    if m["phases"]:
        print(f"{'':17s} denoising {r['minidb_it_per_s']:.2f} it/s vs {r['diffusers_it_per_s']:.2f} it/s, "
              f"decode {r['minidb_decode_s']:.3f}s vs {r['diffusers_decode_s']:.3f}s", flush=True)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", nargs="*", default=[r for r in ROWS if r not in SDXL_ROWS], choices=list(ROWS) + ["sdxl"],
                   help="rows to run (default: all but the SDXL ones; 'sdxl' means every SDXL row)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed runs per implementation, after the warm-up (default: each row's own count in bench/rows.py)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"), help="where to write the figures")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # ROW IMPL TMP: internal
    p.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)  # FAMILY TMP: internal
    args = p.parse_args()
    if args.runs is not None and args.runs < 1:
        p.error(f"--runs must be at least 1, not {args.runs}.")
    if args.prepare:
        print(prepare_load_files(args.prepare[1], args.prepare[0]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device, args.threads, args.worker[2], args.runs)))
        return
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but PyTorch sees no CUDA GPU.")
    rows = [r for row in args.rows for r in (SDXL_ROWS if row == "sdxl" else [row])]
    results, file_gb = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            family = {"load": "SD 1.x", "sdxl-load": "SDXL"}.get(row)
            if family:  # the file, written in a child process, so this driver stays small
                r = subprocess.run([sys.executable, __file__, "--prepare", family, tmp], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"error: preparing the {family} checkpoint failed:\n{r.stderr[-3000:]}")
                file_gb[row] = int(r.stdout.split()[-1]) / 2**30
            results.append(run_row(row, args.device, args.threads, tmp, args.runs))
            if family:
                (Path(tmp) / LOAD_FILES[family]).unlink()  # SDXL's is 6.9 GB
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args.device), "device": args.device,
            "torch": torch.__version__, "threads": args.threads, "load_file_gb": file_gb}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    mem = "peak GPU alloc" if args.device == "cuda" else "peak RSS"
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['date']}\n")
    print(f"| row | size | minidb s | diffusers s | time ratio | minidb {mem} GB | diffusers {mem} GB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['size'] or '-'} | {r['minidb_s']:.3f} | {r['diffusers_s']:.3f} | {r['time_ratio']:.2f} | "
              f"{r['minidb_mem_gb']:.2f} | {r['diffusers_mem_gb']:.2f} | {r['mem_ratio']:.2f} |")
    for r in results:
        if r["row"] in file_gb:  # the target for loading: peak RSS at most 1.3x the file
            size = file_gb[r["row"]]
            for impl in ("minidb", "diffusers"):
                extra = r["peak_rss_gb"][impl] - r["baseline_rss_gb"][impl]
                print(f"{r['row']}: {impl} peak RSS above its import baseline {extra:.2f} GB = {extra / size:.2f}x the "
                      f"{size:.2f} GB file")


if __name__ == "__main__":
    main()
