"""Draw images with Stable Diffusion, or with a model you personalized with train.py.

    python sample.py --prompt "a photo of sks dog on the beach" --n 4

Writes one PNG per image into --out, with the settings stored in the PNG the way AUTOMATIC1111
does (so its "PNG Info" tab reads them), plus a grid when --n > 1. The same seed and settings give
the same picture as diffusers' StableDiffusionPipeline with the matching scheduler.
"""

import argparse
import re
import secrets
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from minidb.fetch import DEFAULT_MODEL, default_model, how_to_get_weights
from minidb.files import ModelFileError, atomic_write
from minidb.info import HELP as MODEL_HELP
from minidb.load import load
from minidb.pipeline import SAMPLER_NAMES, SAMPLERS, decode, grid, sample_latents

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=MODEL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a diffusers folder or a .safetensors/.ckpt file, base or trained (default: SD 1.5 in "
                        "weights/ once `python -m minidb.fetch` has downloaded it, else the toy model weights/toy.safetensors)")
    p.add_argument("--prompt", required=True, help="what to draw; at most 75 CLIP tokens are read")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    p.add_argument("--n", type=int, default=1, help="number of images, drawn as one batch (default: 1)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale; 1 turns guidance off (default: 7.5)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 "
                   "(default: the model's training size, 512 for SD 1.x and 2.x base, 768 for 2.x v models)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: as height)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="(default: ddim, with eta 0)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override the detected prediction type of the model (see below)")
    p.add_argument("--out", default="out", help="folder for the images (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and activations (default: fp16 on CUDA, fp32 on the CPU)")
    return p.parse_args(argv)


def check(args):
    """Every problem with the arguments that can be found before loading anything, as one sentence."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            return f"--{name} must be a positive multiple of 8 (the VAE works in 8x8 pixel cells), not {value}."
    if args.steps < 1 or args.steps > 999:
        return f"--steps must be between 1 and 999, not {args.steps}."
    if args.n < 1:
        return f"--n must be at least 1, not {args.n}."
    if args.dtype == "fp16" and args.device == "cpu":
        return "--dtype fp16 is not supported on the CPU; use fp32 (the default) or bf16."
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return "--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu."
    if not Path(args.model).exists():
        if Path(args.model) == Path(DEFAULT_MODEL):
            return how_to_get_weights()
        return f"No model at {args.model}: pass a diffusers folder or a .safetensors / .ckpt file to --model."
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as e:
        return f"Cannot write to --out {args.out} ({e.strerror}); choose another folder."
    return None


def a1111_parameters(args, seed, size, index):
    """The "parameters" text AUTOMATIC1111 writes into its PNGs."""
    lines = [args.prompt]
    if args.negative_prompt:
        lines.append(f"Negative prompt: {args.negative_prompt}")
    fields = {"Steps": args.steps, "Sampler": SAMPLER_NAMES[args.sampler], "CFG scale": args.guidance, "Seed": seed,
              "Size": f"{size[0]}x{size[1]}", "Model": Path(args.model).stem}
    if args.n > 1:
        fields.update({"Batch size": args.n, "Batch pos": index})
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_png(image, path, text):
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so prompts in any language survive
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def main(argv=None):
    args = parse_args(argv)
    args.model = args.model or str(default_model())  # SD 1.5 once fetched, else the toy model
    problem = check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)

    t0 = time.time()
    try:
        model = load(args.model, dtype=dtype, device=args.device, prediction_type=args.prediction_type)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.vae.float()  # decode in fp32: SD's VAE can overflow in fp16, and it runs once per image
    height = args.height or model.resolution
    width = args.width or height
    print(f"loaded {args.model} ({model.version}, {model.prediction_type}) in {time.time() - t0:.1f}s; "
          f"{args.n} x {width}x{height}, {args.steps} {args.sampler} steps, seed {seed}")

    latents = sample_latents(model, args.prompt, args.negative_prompt, n=args.n, steps=args.steps,
                             guidance=args.guidance, seed=seed, height=height, width=width, sampler=args.sampler)
    images = decode(model, latents)

    out = Path(args.out)
    taken = [int(m[1]) for f in out.glob("*.png") if (m := re.match(r"(\d{5})-", f.name))]
    first = max(taken, default=-1) + 1  # continue numbering; never overwrite earlier images
    for i, image in enumerate(images):
        text = {"parameters": a1111_parameters(args, seed, image.size, i), "prompt": args.prompt,
                "negative_prompt": args.negative_prompt, "seed": seed, "steps": args.steps,
                "guidance": args.guidance, "sampler": args.sampler, "size": f"{image.size[0]}x{image.size[1]}",
                "model": args.model}
        path = out / f"{first + i:05d}-{seed}.png"
        save_png(image, path, text)
        print(f"wrote {path}")
    if len(images) > 1:
        path = out / f"grid-{first:05d}-{seed}.png"
        save_png(grid(images), path, {"parameters": a1111_parameters(args, seed, images[0].size, 0)})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    torch.set_grad_enabled(False)
    sys.exit(main())
