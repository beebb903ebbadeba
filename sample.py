"""Draw images with Stable Diffusion, or with a model you personalized with train.py.

    python sample.py --prompt "a photo of sks dog on the beach" --n 4

Writes one PNG per image into --out, plus a grid when --n > 1. Each PNG carries its settings the way
AUTOMATIC1111 writes them, in one text chunk named "parameters" (its "PNG Info" tab reads it, and so
do ComfyUI and civitai), and minidb's own settings as JSON in a chunk named "minidb".

Seeds: image i of a run is drawn on its own from seed + i, the way AUTOMATIC1111 numbers the images
of a batch, so the seed recorded in each PNG redraws that very image with --n 1. With the same seed
and settings an image is the one diffusers' StableDiffusionPipeline draws with the matching scheduler
and generator=torch.Generator("cpu").manual_seed(seed) (for several images at once, diffusers needs a
list of such generators, one per image, to agree: its single generator draws a whole batch from one
stream). Drawing one image at a time also keeps the memory a run needs independent of --n.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C in the seconds torch takes to import: a sentence, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted.", file=sys.stderr), os._exit(130)))

import argparse
import re
import secrets
import time
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path

import torch

from minidb import hub, memory, pnginfo, runs
from minidb.cli import (DTYPES, SEED_MAX, adapter_problem, check_device, cpu_bf16, fail, nonempty_path, number,
                        path_and_scale, run, text, warn_if_bf16_is_emulated)
from minidb.concepts import mentions
from minidb.dreambooth import NewWord
from minidb.fetch import DEFAULT_MODEL, default_model, how_to_get_weights
from minidb.files import ModelFileError
from minidb.writes import DiskFull, disk_full_is_an_error
from minidb.graphs import UnetGraph
from minidb.info import HELP as MODEL_HELP
from minidb.load import load
from minidb.lora_files import merge_lora
from minidb.pipeline import (DEFAULTS, SAMPLERS, NotFinite, a1111_names, bf16_for_autocast, decode, grid,
                             sample_latents)

SIZE_MAX = 8192  # 16x SD 1.x's own side: a guard against typos; the memory estimate decides what fits
N_MAX = 1000  # the grid of 1000 512-px images is already 16384 x 16384 pixels
GUIDANCE_MAX = 30  # A1111's own slider stops at 30; SD's pictures are burnt long before (1e30 draws black)
STEPS_MAX = 999  # DDIM's "leading" timesteps k * (1000 // n) + 1 would reach t = 1000 at n = 1000
SAMPLER_HELP = """samplers (--sampler):
  ddim      DDIM with eta 0: deterministic, SD's own; fine in 20-50 steps
  ddpm      DDPM (DDIM with eta 1): fresh noise at every step; wants more steps than the others
  euler     Euler: deterministic, first order; fine in 20-50 steps
  euler-a   Euler ancestral: fresh noise at every step, so the picture changes with --steps
  dpmpp-2m  DPM-Solver++ 2M: deterministic, second order; good in 20-25 steps
"""


def optional_text(value):
    """An argparse type for the negative prompt: may be empty, but must be valid UTF-8 when it is not."""
    return text(value) if value.strip() else value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SAMPLER_HELP + "\n" + MODEL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, type=nonempty_path,
                   help="a diffusers folder or a .safetensors/.ckpt file, base or trained, or a Hugging Face Hub id "
                        "owner/name[@revision], downloaded into the Hugging Face cache (default: SD 1.5 in "
                        "weights/ once `python -m minidb.fetch` has downloaded it, else the toy model "
                        "weights/toy.safetensors)")
    p.add_argument("--prompt", type=text, help="what to draw (required); [V] in it is read as the identifier "
                   "train.py recorded in the model, LoRA or embedding given, where they record one; at most 75 CLIP "
                   "tokens are read, unless --long-prompts")
    p.add_argument("--long-prompts", action="store_true", help="read prompts over 75 tokens whole, in 75-token "
                   "chunks whose encodings are concatenated, as AUTOMATIC1111 does (default: cut at 75 tokens, as "
                   "diffusers, with a warning)")
    p.add_argument("--negative-prompt", default="", type=optional_text,
                   help="what to steer away from (default: empty)")
    p.add_argument("--n", type=number(int, 1, N_MAX), default=1,
                   help=f"number of images, drawn one after another from seed, seed + 1, ... "
                        f"(default: 1, at most {N_MAX})")
    p.add_argument("--steps", type=number(int, 1, STEPS_MAX), default=50, help="denoising steps (default: 50)")
    p.add_argument("--guidance", type=number(float, 1, GUIDANCE_MAX), default=None,
                   help=f"classifier-free guidance scale, 1 to {GUIDANCE_MAX}; 1 turns guidance off "
                        f"(default: 7.5; {DEFAULTS['SDXL']['guidance']} for SDXL)")
    p.add_argument("--seed", type=number(int, -1, SEED_MAX), default=None,
                   help="random seed of the first image (default, or -1 as in A1111: a random one, printed)")
    p.add_argument("--height", type=number(int, 8, SIZE_MAX), default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's own training size: 512 "
                        "for SD 1.x, 512 or 768 for SD 2.x, 1024 for SDXL, 64 for the toy model)")
    p.add_argument("--width", type=number(int, 8, SIZE_MAX), default=None,
                   help="image width in pixels, a multiple of 8 (default: as height)")
    p.add_argument("--lora", type=path_and_scale, action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA (kohya, diffusers or PEFT file) into the model, at SCALE (default 1); "
                        "repeat for several")
    p.add_argument("--embedding", type=nonempty_path, action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding; its file name is the word to write in the prompt; "
                        "repeat for several")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="how to step from noise to image; each is described below (default: ddim; "
                        f"{DEFAULTS['SDXL']['sampler']} for SDXL)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override the detected prediction type of the model (see below)")
    p.add_argument("--out", default="out", type=nonempty_path,
                   help="folder for the images, made if missing (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, or cuda (cuda:N for the N-th GPU) (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and activations (default: fp16 on CUDA; on the CPU, fp32 weights under bf16 "
                        "autocast where the CPU has native bf16 (AVX512-BF16, AMX), about twice as fast, else fp32; "
                        "pass fp32 for results equal to diffusers)")
    # --prompt is required, but checked below: argparse checks required flags before it names a misspelt one (--promt)
    p.usage = p.format_usage().removeprefix("usage: ").rstrip().replace("[--prompt PROMPT]", "--prompt PROMPT")
    args = p.parse_args(argv)
    if args.prompt is None:
        p.error("the following arguments are required: --prompt")
    return args


def check(args):
    """Every problem with the arguments that can be found before loading anything, as one sentence."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            return f"--{name} must be a multiple of 8 (the VAE works in 8x8 pixel cells), not {value}."
    if args.seed is not None and args.seed + args.n - 1 > SEED_MAX:
        return f"--seed plus --n must stay within the largest seed, {SEED_MAX}; choose a smaller --seed."
    problem = check_device(args.device)
    if problem:
        return problem
    if args.dtype == "fp16" and torch.device(args.device).type == "cpu":
        return "--dtype fp16 is not supported on the CPU; use fp32 (the default) or bf16."
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        tag = re.search(r"<(?:lora|lyco):([^:>]*)[^>]*>", text, re.IGNORECASE)  # A1111's way to apply a LoRA: here
        if tag:  # letters for CLIP, and in the PNG as if applied (a prompt copied from a PNG's, minidb's own too)
            given = any(Path(path).stem == tag[1] for path, _ in args.lora)
            return (f"{flag} holds {tag[0]}, AUTOMATIC1111's tag for a LoRA, which sample.py does not read; "
                    + ("remove it: --lora already applies that file." if given else
                       "give the file as --lora PATH:WEIGHT instead (e.g. --lora style.safetensors:0.8)."))
    if args.guidance == 1 and args.negative_prompt.strip():  # guidance steers away from it; at 1 there is none
        warnings.warn("--negative-prompt does nothing at --guidance 1, which draws without guidance (the picture is the "
                      "same without it); raise --guidance to use it.")
    problem = (adapter_problem("--lora", [path for path, _ in args.lora])
               or adapter_problem("--embedding", args.embedding))
    if problem:
        return problem
    stems = [Path(path).stem.lower() for path in args.embedding]
    twice = next((word for k, word in enumerate(stems) if word in stems[:k]), None)
    if twice:
        paths = ", ".join(path for path, word in zip(args.embedding, stems) if word == twice)
        return f"--embedding gives the word {twice!r} twice ({paths}); give each word once."
    try:
        model = hub.local_path(args.model)  # a Hub id: downloaded now, or one sentence why it cannot be
    except ModelFileError as e:
        return str(e)
    if not Path(model).exists():
        if Path(args.model) == Path(DEFAULT_MODEL):
            return how_to_get_weights()
        return (f"No model at {args.model}: pass a diffusers folder, a .safetensors / .ckpt file or a Hugging Face "
                "Hub id (owner/name) to --model.")
    out = Path(args.out)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not out.is_dir():
        return (f"--out {args.out} looks like a picture's name, but --out is the folder the pictures go into "
                f"(each named by its number and seed); pass a folder, such as --out {out.parent / out.stem}.")
    nearest = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())  # the folder is made later
    if not nearest.is_dir():
        return f"--out {args.out} cannot be a folder: {nearest} is a file; choose another --out."
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"Cannot write to --out {args.out} ({nearest} is not writable); choose another folder."
    run = next((p for p in (out.absolute(), *out.absolute().parents) if runs.is_run_folder(p)), None)
    if run:  # a picture there would stop train.py resuming the run, or go with the next export (RUN/model/)
        return (f"--out {args.out} is {'' if run == out.absolute() else 'inside '}a train.py run's folder, which holds "
                f"only what the run writes; draw into another folder, such as --out {run.with_name(run.name + '-samples')}.")
    made = [p for p in (out, *out.parents) if not p.exists()]  # the deepest first
    try:
        runs.run_folder(out, resume=False)  # made and written to, as train.py checks its --out
    except runs.RunError as e:
        return str(e)
    finally:  # made only to prove it can be: a run that fails before its first image leaves nothing behind
        for folder in made:
            with suppress(OSError):
                folder.rmdir()
    return None


def fill_identifier(prompt, paths, embeddings):
    """[V], the docs' placeholder for the subject, read as the identifier that the files given (a model or LoRA
    that train.py exported: `paths`) record, or as the word of an embedding it exported (its file's name, as
    A1111 reads it, even when renamed since), when there is exactly one; else a warning, and the model reads
    the letters [V]. An identifier recorded as a new word gets a warning when the prompt holds it but no
    --embedding gives it: without its embedding the model reads it as letters. A prompt that names no
    recorded identifier, with no --embedding, gets a note: it draws the class, not the subject."""
    words = [Path(path).stem.lower() for path in embeddings]
    renamed = {was for word, path in zip(words, embeddings) for was in runs.recorded_identifiers([path]) if was != word}
    if "[V]" in prompt:  # (a model or LoRA records a renamed embedding's word as it was trained: it is the file's now)
        found = list(dict.fromkeys([w for w in runs.recorded_identifiers(paths) if w not in renamed] +
                                   [word for word, path in zip(words, embeddings) if runs.run_record(path)]))
        if len(found) == 1:
            print(f"[V] in the prompt is read as {found[0]}, the identifier that the train.py run recorded in its files.")
            prompt = prompt.replace("[V]", found[0])
        else:
            these = f"; these files record {', '.join(found)}" if found else ""
            warnings.warn("The prompt holds [V], which the model reads as those letters; write the identifier your "
                          f"train.py run printed instead (its README.md names it{these}).")
    elif not words:  # a prompt copied from elsewhere ("sks dog") draws the class, not the subject: say what would
        found = runs.recorded_identifiers(paths)
        if found and not any(mentions(prompt, word) for word in found):
            print(f"note: the prompt names no subject these files were trained on ({', '.join(found)}), so it draws "
                  f"without one; write {'[V] or ' * (len(found) == 1)}{' or '.join(found)} where the subject goes.")
    named = set(words) | renamed  # given by --embedding (renamed or not), or already warned about (a model and a LoRA
    # may both record a word)
    for subject in runs.recorded_subjects(paths):
        word = subject["identifier"]
        if subject["new_word"] and word not in named and mentions(prompt, word):
            named.add(word)
            warnings.warn(f"{word} in the prompt is a new word that the train.py run learned as an embedding, so "
                          f"without it the model reads {word} as letters and leaves the subject out; add --embedding "
                          f"{runs.embedding_to_add(subject)}.")
    return prompt


def save_png(image, path, parameters, settings):
    try:
        with disk_full_is_an_error(path.parent, 3 * image.width * image.height, "the next image",
                                   "draw again (the images written so far are kept)"):
            pnginfo.save_png(image, path, parameters, settings)
    except DiskFull as e:
        fail(e)
    except OSError as e:
        fail(f"Cannot write {path} ({e.strerror or e}); choose another --out.")


def not_finite(args, dtype_name):
    """Why a picture came out as NaN or infinite numbers, as far as sample.py can tell, in one sentence."""
    files = [args.model, *(path for path, _ in args.lora), *args.embedding]
    weights = (f"{' or '.join(map(str, files))} likely hold{'s' * (len(files) == 1)} broken weights (NaN, or numbers "
               "far too large)")
    if dtype_name == "fp16":  # fp16 overflows past 65504; bf16 and fp32 reach 3e38
        return (f"The picture came out as NaN or infinite numbers, so it was not saved: fp16 likely overflowed, so "
                f"draw again with --dtype fp32 (if that fails too, {weights}).")
    return f"The picture came out as NaN or infinite numbers, so it was not saved: {weights}; use other files."


def out_of_memory(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)  # the CPU's message


def main(argv=None):
    args = parse_args(argv)
    args.model = args.model or str(default_model())  # SD 1.5 once fetched, else the toy model
    problem = check(args)
    if problem:
        fail(problem)
    device = torch.device(args.device)
    warn_if_bf16_is_emulated(device, args.dtype, "--dtype")
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    # The CPU's default where bf16 is native: bf16 autocast for the text encoder, the UNet and the VAE (norms and
    # softmax stay fp32 there; bf16 has fp32's range, so SD's VAE does not overflow as in fp16). bench/cpu_bf16.py
    # measures the speed and the picture difference.
    bf16_autocast = args.dtype is None and device.type == "cpu" and cpu_bf16()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else nullcontext()
    if bf16_autocast:
        dtype_name = "fp32+bf16-autocast"
    seed = args.seed if args.seed not in (None, -1) else secrets.randbelow(2**32)

    t0 = time.time()
    try:
        model = load(args.model, dtype=dtype, device=device, prediction_type=args.prediction_type)
    except ModelFileError as e:
        fail(str(e))
    try:  # adapters are merged into the weights, so drawing is exactly as fast as without them
        loras = [(Path(path).stem, scale, merge_lora(model, path, scale)) for path, scale in args.lora]
        words = [NewWord.from_file(model, path).attach(model.text_encoder, model.text_encoder_2)
                 for path in args.embedding]
    except ModelFileError as e:
        fail(str(e))
    args.prompt = fill_identifier(args.prompt, [args.model, *(path for path, _ in args.lora)], args.embedding)
    for name, value in DEFAULTS[model.version].items():  # the version's own, unless asked otherwise
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if model.vae.cfg.force_upcast:  # SDXL's VAE overflows in fp16, SD's can; it runs once per image
        model.vae.float()
    if bf16_autocast:  # after merging LoRAs: convolution and linear weights in bf16, as autocast computes them
        for part in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
            if part is not None:
                bf16_for_autocast(part)
    vae_dtype = "bf16 autocast" if bf16_autocast else str(next(model.vae.parameters()).dtype).removeprefix("torch.")
    height = args.height or model.resolution
    width = args.width or height
    images_bytes = (2 if args.n > 1 else 1) * args.n * height * width * 3  # the finished images and the grid, in RAM
    problem = memory.problem(f"drawing {args.n} image{'s' if args.n > 1 else ''} of {width}x{height}",
                             memory.drawing_bytes(model, height, width, guide=args.guidance > 1), images_bytes,
                             device, "choose a smaller size" + (" or fewer images" if args.n > 1 else ""))
    if problem:
        fail(problem)
    model_path = Path(args.model)
    model_name = model_path.stem if model_path.is_file() else model_path.name  # A1111's Model: no folders, no suffix
    model_hash = pnginfo.sha256(model_path)[:10] if model_path.is_file() else None  # a folder or Hub id: none
    unused = [w.word for w in words if not any(mentions(text, w.word) for text in (args.prompt, args.negative_prompt or ""))]
    if unused:  # an embedding only adds a word: unwritten, it changes nothing
        print(f"note: neither prompt names {' or '.join(unused)}, so the embedding{'s' * (len(unused) > 1)} given for "
              f"{'them' if len(unused) > 1 else 'it'} change{'s' * (len(unused) == 1)} nothing; write the word where "
              "it belongs in the prompt.")
    # as A1111 records them: each LoRA as a <lora:name:scale> tag in the prompt, and the files' short hashes
    recorded_prompt = args.prompt + "".join(f" <lora:{name}:{scale:g}>" for name, scale, _ in loras)
    extras = {"Lora hashes": pnginfo.hashes((name, pnginfo.sha256(path, skip_header=True)[:12])
                                            for (name, _, _), (path, _) in zip(loras, args.lora)),
              "TI hashes": pnginfo.hashes((w.word, pnginfo.sha256(path)[:12]) for w, path in zip(words, args.embedding)
                                          if w.word not in unused)}  # (A1111 lists the embeddings its prompts use)

    def parameters(seed):  # A1111's fields, in its order
        sampler, schedule, sampler_extra = a1111_names(args.sampler, model.version)
        return pnginfo.parameters(recorded_prompt, args.negative_prompt, {
            "Steps": args.steps, "Sampler": sampler, "Schedule type": schedule,
            "CFG scale": str(args.guidance).removesuffix(".0"), "Seed": seed, "Size": f"{width}x{height}",
            "Model hash": model_hash, "Model": model_name, "RNG": "CPU", **sampler_extra, **extras})
    print(f"loaded {args.model} ({model.version}, {model.prediction_type}) in {time.time() - t0:.1f}s; "
          f"{args.n} x {width}x{height}, {args.steps} {args.sampler} steps, guidance {args.guidance:g}, seed {seed};"
          + (" bf16 autocast (--dtype fp32 for results equal to diffusers);" if bf16_autocast else "")
          + f" the VAE decodes in {vae_dtype}"
          + (" (its config says it is safe in fp16)" if vae_dtype in ("float16", "bfloat16") else ""))

    out = Path(args.out)
    taken = [int(m[1]) for f in out.glob("*.png") if (m := re.match(r"(\d{5})-", f.name))]
    first = max(taken, default=-1) + 1  # continue numbering; never overwrite earlier images
    images, graph = [], UnetGraph(model.unet)  # on a GPU the UNet is recorded once, for every picture
    for i in range(args.n):
        try:
            with autocast:
                latents = sample_latents(model, args.prompt, args.negative_prompt, n=1, steps=args.steps,
                                         guidance=args.guidance, seed=seed + i, height=height, width=width,
                                         sampler=args.sampler, long_prompts=args.long_prompts, graph=graph)
                if not torch.isfinite(latents).all():  # the last guard: a black picture is not saved
                    fail(not_finite(args, dtype_name))
                image = decode(model, latents)[0]
        except NotFinite:  # the VAE's own overflow, or broken VAE weights
            fail(not_finite(args, "fp16" if vae_dtype == "float16" else "fp32"))
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            fail(f"ran out of memory drawing a {width}x{height} image on {device}; choose a smaller size.")
        settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed + i,
                    "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler, "width": width,
                    "height": height, "model": model_path.name, "model_version": model.version,
                    "prediction_type": model.prediction_type, "dtype": dtype_name, "vae_dtype": vae_dtype,
                    "device": device.type, "loras": [[name, scale] for name, scale, _ in loras],
                    "embeddings": [w.word for w in words]}
        path = out / f"{first + i:05d}-{seed + i}.png"
        save_png(image, path, parameters(seed + i), settings)
        print(f"wrote {path}")
        images.append(image)
    if len(images) > 1:
        path = out / f"grid-{first:05d}-{seed}.png"
        save_png(grid(images), path, parameters(seed), {**settings, "seed": seed, "n": args.n})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
