"""Activation memory of one DreamBooth training step, with and without train.py's memory savers.

    python bench/train_memory.py                 # CPU: SD 1.5 shapes at 256 px, peak RSS
    python bench/train_memory.py --device cuda   # GPU: 512 px, bf16 autocast, peak allocated
    python bench/train_memory.py --batches 1 2 4 # what a bigger --batch-size costs (cached and lora)

Three settings, each in a fresh process, with SD 1.5-shaped random weights:
  plain      each step encodes the two images with the VAE and the two prompts with the text
             encoder, then UNet forward + backward + AdamW (what a script without caching does)
  cached     latents and text embeddings computed once before training (train.py does this
             whenever the VAE / text encoder are frozen), so a step is UNet + AdamW only
  cached+gc  the same with --gradient-checkpointing
  lora       cached, but the UNet frozen and rank-16 LoRA adapters on it trained (train.py --method lora),
             lr 1e-4; the adapters' kohya file is written and its size reported
  lora+gc    the same with --gradient-checkpointing
The figure is the peak memory training adds on top of the loaded weights, over two steps: gradients
(3.4 GB in fp32 for SD 1.5's UNet), AdamW state (6.9 GB) and activations for full fine-tuning; for
LoRA, the adapters' few megabytes of gradients and state, and activations. The time is that of the
second step.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(setting, device, size, batch=1):
    import torch
    import torch.nn.functional as F
    from bench.models import build, rss_gb
    from minidb.vae import LATENT_SCALE
    torch.set_num_threads(2)
    from minidb.lora import LoRA, save_kohya
    lora = setting.startswith("lora")
    unet = build("unet", "minidb", device, torch.float32).train().requires_grad_(not lora)
    vae, text = build("vae", "minidb", device, torch.float32), build("text", "minidb", device, torch.float32)
    unet.gradient_checkpointing = setting.endswith("+gc")
    file_mb = None
    if lora:
        model = types.SimpleNamespace(unet=unet, text_encoder=text, version="SD 1.x", prediction_type="epsilon")
        adapters = LoRA(model, rank=16).attach()
        with tempfile.TemporaryDirectory() as tmp:
            save_kohya(adapters, Path(tmp) / "lora.safetensors")
            file_mb = (Path(tmp) / "lora.safetensors").stat().st_size / 1e6
        trained = list(adapters.parameters())
    else:
        trained = list(unet.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-4 if lora else 5e-6, weight_decay=1e-2)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    images = torch.rand(2 * batch, 3, size, size, device=device) * 2 - 1  # each subject image has a prior image
    ids = torch.randint(0, 49407, (2 * batch, 77), device=device)
    with torch.no_grad():
        cached = vae.encode(images).mean * LATENT_SCALE, text(ids)

    def step():
        if setting == "plain":
            with torch.no_grad():
                x0, ctx = vae.encode(images).sample() * LATENT_SCALE, text(ids)
        else:
            x0, ctx = cached
        noise, t = torch.randn_like(x0), torch.linspace(100, 700, len(x0), device=device).long()
        with amp:
            pred = unet(x0 + noise, t, ctx).float()  # the noising itself does not matter for memory
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_gb("VmRSS")
    step()  # AdamW allocates its state here
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    if device == "cuda":
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
    else:  # the process's peak: the C allocator keeps freed pages, so a later baseline would hide them
        extra = rss_gb("VmHWM") - before
    return {"setting": setting, "batch": batch, "step_gb": extra, "seconds": seconds, "file_mb": file_mb,
            "trained_params": sum(p.numel() for p in trained)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="instead: the cached and lora settings at these --batch-size values")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    size = 512 if args.device == "cuda" else 256
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, size, args.batch)))
        return
    if args.batches:
        return batches(args, size)
    rows = []
    for setting in ("plain", "cached", "cached+gc", "lora", "lora+gc"):
        rows.append(measure(args.device, setting))
        print(f"{setting:10s} training adds {rows[-1]['step_gb']:.2f} GB, {rows[-1]['seconds']:.1f} s", flush=True)
    print(f"\n| setting ({size} px, {args.device}) | trained params | peak memory training adds, GB | step s |"
          "\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['trained_params'] / 1e6:.1f} M | {r['step_gb']:.2f} | {r['seconds']:.1f} |")
    full, lora = next(r for r in rows if r["setting"] == "cached"), next(r for r in rows if r["setting"] == "lora")
    print(f"\nLoRA adds {lora['step_gb'] / full['step_gb']:.1%} of what full fine-tuning adds (target <= 25%); "
          f"its step takes {lora['seconds'] / full['seconds']:.2f}x the time; a rank-16 SD 1.5 UNet LoRA file "
          f"(fp16, kohya) is {lora['file_mb']:.1f} MB")


def measure(device, setting, batch=1):
    """One setting in a fresh process, so that its peak memory is its own."""
    r = subprocess.run([sys.executable, __file__, "--device", device, "--worker", setting, "--batch", str(batch)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {setting} at batch {batch} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def batches(args, size):
    """Step time and the memory training adds at each --batch-size (subject + prior image per example)."""
    rows = []
    for setting in ("cached", "lora"):
        for batch in args.batches:
            rows.append(measure(args.device, setting, batch))
            print(f"{setting:7s} batch {batch}: adds {rows[-1]['step_gb']:.2f} GB, {rows[-1]['seconds']:.1f} s", flush=True)
    print(f"\n| setting ({size} px, {args.device}) | --batch-size | images per step | step s | s per image | "
          "peak memory training adds, GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'full' if r['setting'] == 'cached' else 'lora'} | {r['batch']} | {2 * r['batch']} | {r['seconds']:.1f} | "
              f"{r['seconds'] / (2 * r['batch']):.2f} | {r['step_gb']:.2f} |")


if __name__ == "__main__":
    main()
