"""Peak GPU memory of a real SDXL DreamBooth LoRA run through train.py itself (GPU only).

    python bench/sdxl_train_gpu.py [--steps 4] [--extra "--train-text-encoder"]

Builds an SDXL-shaped model with random weights on the GPU, writes it as an fp16 single file (6.9 GB,
deleted afterwards), then runs train.py's default SDXL recipe on three random 1024 px photos: LoRA rank
16, lr 1e-4, prior preservation (2 class images, drawn at 2 steps), bf16 mixed precision, with
--gradient-checkpointing (unless --no-gradient-checkpointing: then the step is replayed as CUDA graphs),
the final validation grid and the export included. It reports the peak
memory torch allocated and reserved over the whole run, and the median step time from the run's log.
The issue's target: LoRA training with checkpointing fits in 16 GB (a 16 GB card).
"""

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--extra", default="", help="more train.py flags, e.g. --train-text-encoder")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="leave it out: the step is then recorded as CUDA graphs (minidb/graphs.py)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU.")
    import train
    from minidb import text_encoder as te, unet as un, vae as va
    from minidb.load import StableDiffusion
    from minidb.save import save_single_file
    from minidb.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        with torch.device("cuda"):
            torch.manual_seed(0)
            model = StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(te.SDXL_L), va.AutoencoderKL(va.SDXL),
                                    un.UNet(un.SDXL), "SDXL", "epsilon", Tokenizer.for_version("SD 2.x"),
                                    te.TextEncoder(te.SDXL_G))
        save_single_file(model, tmp / "sdxl.safetensors", dtype=torch.float16)
        del model
        torch.cuda.empty_cache()
        print(f"wrote a random SDXL file in {time.time() - t0:.0f} s", flush=True)
        rng = np.random.default_rng(0)
        (tmp / "photos").mkdir()
        for i, (h, w) in enumerate([(1024, 1024), (1200, 1600), (1536, 1024)]):  # square, wide, tall
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / "photos" / f"{i}.png")

        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = tmp / "run"
        argv = ["--model", str(tmp / "sdxl.safetensors"), "--images", str(tmp / "photos"), "--class", "dog",
                "--out", str(out), "--steps", str(args.steps), "--class-images", "2", "--sample-steps", "2",
                "--class-cache", str(tmp / "cache"), "--mixed-precision", "bf16",
                *([] if args.no_gradient_checkpointing else ["--gradient-checkpointing"]),
                *shlex.split(args.extra)]
        train.main(argv)
        wall = time.time() - t0
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        result = {"argv": " ".join(argv[2:]), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                  "median_step_s": statistics.median(r["step_time"] for r in log[1:] or log),
                  "losses": [r["loss"] for r in log], "wall_s": wall,
                  "lora_mb": (out / "lora.safetensors").stat().st_size / 1e6}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
