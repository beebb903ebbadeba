"""Will it fit? The memory a drawing or a training step needs, checked before the work starts.

An out-of-memory kill cannot be caught, and on Linux it often takes the whole machine's patience with
it first. So both scripts estimate what they will need beyond the loaded weights and compare it with
what the machine has free; a request far beyond it is one sentence instead. The rules are rough,
calibrated on the CPU and rounded down, so they refuse only what clearly cannot fit; a run close to
the limit may still run out.
"""

import os
import warnings
from pathlib import Path

import torch


def drawing_bytes(model, height, width, batch=1, guide=True):
    """Bytes of activations while drawing `batch` images at once (peak RSS over the loaded model, fp32,
    measured for SD 1.5's shapes at 512 px: UNet step 0.17 GB, VAE decode 0.98 GB, where the rule says
    0.17 and 0.54; for the toy model: 0.20 and 0.26 GB, where it says 0.13 and 0.13). Only one of the
    two networks holds activations at a time:
    - the UNet about 16 feature maps the size of its first level's, (b, C, H/f, W/f), b = 2 with guidance;
    - the VAE decoder, in fp32, about 4 maps of its full-resolution level (128 x H x W for SD), one
      image at a time;
    - MINIDB_ATTENTION=math holds (L, L) attention scores and probabilities, L = H/f * W/f latent pixels:
      the VAE's single head, and the UNet's (b, heads, L, L) at its first attention level.
    """
    f = 2 ** (len(model.vae.cfg.ch_mult) - 1)  # latent pixels are f x f image pixels
    latent = (height // f) * (width // f)
    b = batch * (2 if guide else 1)
    ucfg, vcfg = model.unet.cfg, model.vae.cfg
    unet = 16 * b * ucfg.model_channels * latent * next(model.unet.parameters()).element_size()
    vae = 4 * vcfg.ch * vcfg.ch_mult[0] * height * width * 4
    if os.environ.get("MINIDB_ATTENTION", "").lower() == "math":
        vae += 2 * latent**2 * 4
        if ucfg.attention_levels:
            level = ucfg.attention_levels[0]
            heads = ucfg.num_heads or ucfg.model_channels * ucfg.channel_mult[level] // ucfg.head_dim
            unet += 2 * b * heads * (latent // 4**level) ** 2 * 4
    return max(unet, vae)


def available_ram():
    """Memory that can be had without swapping, in bytes: Linux's MemAvailable, or less when a container's
    limit (cgroup v2's memory.max) leaves less; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def problem(what, on_device, in_ram, device, advice):
    """One sentence if `what` needs more than is free (on_device bytes on a GPU, in_ram bytes of RAM;
    on the CPU both come out of RAM), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if on_device > free:
            return (f"{what} needs about {on_device / 1e9:,.1f} GB of GPU memory beyond the model's weights "
                    f"(a rough estimate), but {device} has {free / 1e9:,.1f} GB free; {advice}.")
    else:
        in_ram += on_device
    ram = available_ram()
    if ram is not None and in_ram > ram:
        return (f"{what} needs about {in_ram / 1e9:,.1f} GB of memory beyond the model's weights "
                f"(a rough estimate), but this machine has {ram / 1e9:,.1f} GB available; {advice}.")
    return None


def training_problem(model, parts, text_parts, args, resolution, device):
    """train.py's check, as one sentence or None. Drawing the class prior 4 images at a time, or a step:
    the trained parameters' fp32 gradients and AdamW's two moments (8-bit: one byte each), plus a
    forward's activations. Full fine-tuning of SDXL also gets a warning of what its weights alone take."""
    n_trained = 0 if args.method != "full" else sum(  # adapters and a new word are megabytes at most
        p.numel() for name in (["unet", *text_parts] if args.train_text_encoder else ["unet"])
        for p in parts[name].parameters())
    step_bytes = (4 + (2 if args.use_8bit_adam else 8)) * n_trained + drawing_bytes(model, resolution, resolution)
    if model.version == "SDXL" and args.method == "full":
        advice = " and ".join(flag for flag, on in (("--use-8bit-adam", args.use_8bit_adam),
                                                    ("--gradient-checkpointing", args.gradient_checkpointing)) if not on)
        warnings.warn(f"--method full on SDXL trains {n_trained / 1e9:.1f} B parameters, whose fp32 weights, gradients "
                      f"and AdamW moments take {16 * n_trained / 2**30:.0f} GB of GPU memory before activations (8-bit "
                      f"Adam: {10 * n_trained / 2**30:.0f} GB){f'; add {advice}' if advice else ''}, or train a LoRA "
                      "(--method lora, SDXL's default).", stacklevel=3)
    return problem(f"training at {resolution} px", max(step_bytes, drawing_bytes(model, resolution, resolution, batch=4)),
                   0, device, "choose a smaller --resolution (or --use-8bit-adam on a GPU)")
