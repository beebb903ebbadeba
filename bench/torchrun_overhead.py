"""What launching train.py under torchrun costs when there is one process (issue 15: at most 3%).

    python bench/torchrun_overhead.py --device cuda       # SD 1.5-shaped random weights, 512 px, bf16
    python bench/torchrun_overhead.py                     # CPU: the toy model (weights/toy.safetensors), 64 px
    python bench/torchrun_overhead.py --model sd15 --size 64 --steps 2 --rounds 1 --method lora   # its path, on the CPU

The same training run twice per round, each a fresh process: `python train.py ...` and
`torchrun --standalone --nproc_per_node 1 train.py ...`, the order alternating between rounds so that
neither always runs on a warmer machine. With one process train.py is a world of one under torchrun
too: no DistributedDataParallel, no all-reduces (minidb/distributed.py), so what torchrun may add is
the launcher, the process group's start-up and its watchdog thread. The figure is the median step
time from each run's log.jsonl, the first steps left out (warm-up, the cuDNN search); the whole
command's wall time, launcher start-up included, is reported beside it. The class prior is drawn
once into a shared cache before the rounds, so no run pays for it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WARMUP = 5  # steps left out of the median


def sd15_file(path):
    """An SD 1.5-shaped model with random weights, written as an fp16 single file (2 GB)."""
    from minidb import text_encoder as te, unet as un, vae as va
    from minidb.load import StableDiffusion
    from minidb.save import save_single_file
    from minidb.tokenizer import Tokenizer
    torch.manual_seed(0)
    model = StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(te.SD1), va.AutoencoderKL(va.SD),
                            un.UNet(un.SD1), "SD 1.x", "epsilon")
    save_single_file(model, path, dtype=torch.float16)
    return path


def train(launch, argv, out):
    """Run one train.py; (median step time after WARMUP, the command's wall time)."""
    cmd = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", "1"]}[launch]
    t0 = time.time()
    done = subprocess.run([*cmd, str(ROOT / "train.py"), *argv, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        sys.exit(f"error: {launch} train.py failed:\n{done.stderr[-3000:]}")
    times = [json.loads(line)["step_time"] for line in open(out / "log.jsonl")]
    shutil.rmtree(out)  # a full run of SD 1.5 leaves 14 GB (its checkpoint and model): one at a time on the disk
    return statistics.median(times[WARMUP:] or times), wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs, the order alternating (default: %(default)s)")
    p.add_argument("--model", choices=["toy", "sd15"], default=None,
                   help="the toy model, or SD 1.5's shapes with random weights (default: sd15 on cuda, toy on the CPU)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: 512 for sd15, 64 for toy)")
    p.add_argument("--method", default="full", choices=["full", "lora"], help="what trains (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd15 = (args.model or ("sd15" if args.device == "cuda" else "toy")) == "sd15"
        model = sd15_file(tmp / "sd15.safetensors") if sd15 else ROOT / "weights" / "toy.safetensors"
        size = args.size or (512 if sd15 else 64)
        precision = "bf16" if args.device == "cuda" else "no"
        (tmp / "photos").mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp / "photos" / f"{i}.png")
        argv = ["--images", str(tmp / "photos"), "--class", "dog", "--model", str(model), "--device", args.device,
                "--steps", str(args.steps), "--method", args.method, "--class-images", "4", "--sample-steps", "2",
                "--drift-images", "0", "--class-cache", str(tmp / "cache"), "--mixed-precision", precision,
                "--validation-images", "1"]
        train("python", [*argv, "--steps", "1"], tmp / "warm")  # fills the class cache (the last --steps counts)
        rows = []
        for r in range(args.rounds):
            order = ["python", "torchrun"] if r % 2 == 0 else ["torchrun", "python"]
            row = {launch: train(launch, argv, tmp / f"{launch}-{r}") for launch in order}
            row = {"round": r, **{f"{launch} step s": row[launch][0] for launch in order},
                   **{f"{launch} wall s": row[launch][1] for launch in order}}
            row["step ratio"] = row["torchrun step s"] / row["python step s"]
            rows.append(row)
            print(f"round {r}: median step {row['python step s'] * 1e3:.1f} ms plain, {row['torchrun step s'] * 1e3:.1f} ms "
                  f"under torchrun (x{row['step ratio']:.3f}); wall {row['python wall s']:.1f} s and "
                  f"{row['torchrun wall s']:.1f} s", flush=True)
    pooled = statistics.median(r["torchrun step s"] for r in rows) / statistics.median(r["python step s"] for r in rows)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"torchrun with one process: x{pooled:.3f} the plain step time ({(pooled - 1) * 100:+.1f}%), {device}, "
          f"{'SD 1.5 shapes' if sd15 else 'toy model'}, {args.method}, {size} px, {args.steps} steps per run")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "model": "SD 1.5 shapes" if sd15 else "toy",
                                               "method": args.method,
                                               "size": size, "steps": args.steps, "warmup_steps_left_out": WARMUP,
                                               "rounds": rows, "pooled step ratio": pooled}, indent=1) + "\n")


if __name__ == "__main__":
    main()
