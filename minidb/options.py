"""train.py's options: every flag, each method's own defaults, and the checks that refuse a bad value or
a combination that means nothing, in one sentence, before any work starts."""

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch

from minidb import hub, runs
from minidb.resume import METHOD_FLAGS, keep_the_runs_own
from minidb.state import NOT_A_RESUME_POINT
from minidb.concepts import class_dir_problem, placeholder_problem
from minidb.cli import DTYPES, SEED_MAX, check_device, fail, nonempty_path, number, text
from minidb.fetch import DEFAULT_MODEL, TOY_MODEL, how_to_get_weights
from minidb.files import WEIGHT_SUFFIXES, ModelFileError
from minidb.info import HELP as MODEL_HELP
from minidb.loop import SCHEDULES
from minidb.tokenizer import can_be_a_new_word


def parse_args(argv, doc):
    """train.py's arguments; `doc` is its docstring, whose first paragraph --help shows, the rest below."""
    p = argparse.ArgumentParser(prog="train.py", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 2)[2] + "\n" + MODEL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    count, positive = number(int, low=0), number(float, above=0)
    a("--images", default=None, type=nonempty_path, help="folder with 3-5 photos of the subject (JPEG, PNG or "
      "WebP); a photo.txt beside photo.jpg is that photo's caption, with [V] for the identifier")
    a("--concepts", default=None, type=nonempty_path, help="several subjects in one run instead of --images and "
      '--class: a JSON list of {"images": ..., "class": ..., "identifier"?: ..., "instance_prompt"?: ..., '
      '"class_prompt"?: ...}, a relative images folder read from the file\'s own folder (full or lora; a new word '
      "is learned for one subject per run)")
    a("--method", choices=list(METHOD_LR), default=None, help="what trains: full, the whole UNet (the paper); "
      "lora, low-rank adapters on it (a small file any UI loads); textual-inversion, only a new word's embedding "
      "(default: full; lora for SDXL, whose 2.6 B-parameter UNet full training needs a large GPU)")
    a("--class", dest="class_name", default=None, type=text, help="what the subject is, e.g. dog, backpack")
    a("--model", default=None, type=nonempty_path, help="base model: a diffusers folder, a .safetensors/.ckpt file or "
      "a Hugging Face Hub id owner/name[@revision], downloaded into the Hugging Face cache (default: SD 1.5 in "
      "weights/ once `python -m minidb.fetch` has downloaded it, else the toy model weights/toy.safetensors)")
    a("--out", default=None, type=nonempty_path,
      help="the run's folder (default: a new runs/dreambooth-N, linked as runs/latest once it begins)")
    a("--overwrite", action="store_true", help="delete the run already in --out and start it over")
    a("--resume", nargs="?", const="latest", default=None, metavar="latest|STEP|PATH", type=resume_point,
      help="continue the run in --out (default: runs/latest) from its latest checkpoint, from the checkpoint of "
      "step STEP, or from the checkpoint folder PATH (without --out, PATH's own run; a run's folder as PATH: its "
      "latest, as --out PATH --resume); a flag left out is the run's own, and only --steps, "
      "--save-every, --validate-every, --checkpoints-keep, --class-cache and the validation flags may differ "
      "from it (and --concepts's place, not its subjects; under torchrun, the number of processes, not the global "
      "batch)")
    a("--identifier", default=None, type=text, help="the subject's token [V] (default: a rare CLIP token of <= 3 "
      "letters, not one a model train.py made has learned already; with a new word, its spelling, which must not "
      "be a token yet)")
    a("--new-token", action="store_true", help="with full or lora: [V] becomes a new word whose embedding trains "
      "too (pivotal tuning); textual-inversion always does this")
    a("--num-vectors", type=number(int, low=1, high=16), default=None, help="embedding vectors of the new word (default: 1)")
    a("--lora-rank", type=number(int, low=1, high=1024), default=None, help="rank of the LoRA adapters (default: 16)")
    a("--lora-alpha", type=number(float, above=0, high=LORA_ALPHA_MAX), default=None, help="LoRA alpha, at most "
      f"{LORA_ALPHA_MAX}; updates are scaled by alpha/rank (default: the rank)")
    a("--instance-prompt", default=None, type=text, help="caption of the subject photos; [V] stands for the identifier (default: 'a photo of a [V] CLASS')")
    a("--class-prompt", default=None, type=text, help="prompt of the prior images (default: 'a photo of a CLASS')")
    a("--long-prompts", action="store_true", help="read prompts over 75 tokens whole, in 75-token chunks whose "
      "encodings are concatenated, as AUTOMATIC1111 does (default: cut at 75 tokens, as diffusers, with a warning)")
    a("--steps", type=number(int, low=1, high=STEPS_MAX), default=None, help="training steps, at most "
      f"{STEPS_MAX:,} (default: 800, within the paper's 800-1000 for SD; 1200 for full fine-tuning of the toy model "
      "weights/toy.safetensors, by that path, not a copy)")
    a("--batch-size", type=number(int, low=1, high=BATCH_MAX), default=1, help="subject images per step, each with a "
      f"class-prior image beside it, at most {BATCH_MAX} (default: %(default)s)")
    a("--grad-accum", type=number(int, low=1, high=BATCH_MAX), default=1, help="split each step into this many "
      f"micro-batches whose gradients add up: the same step in less memory, at most {BATCH_MAX} (default: %(default)s)")
    a("--lr", type=number(float, above=0, high=1), default=None, help="peak learning rate of what trains "
      "(default: 5e-6 full, 1e-4 on the toy model weights/toy.safetensors by that path; 1e-4 lora; 5e-3 "
      "textual-inversion)")
    a("--lr-schedule", choices=SCHEDULES, default="constant", help="after the warmup: constant, cosine or linear "
      "decay to 0, or polynomial decay to 1e-7, as diffusers' schedulers (default: %(default)s)")
    a("--warmup-steps", type=count, default=0, help="linear learning-rate warmup from 0 (default: %(default)s)")
    a("--scale-lr", action="store_true", help="multiply --lr by the images per step (batch size x grad-accum x "
      "processes), as diffusers' --scale_lr")
    a("--resolution", type=number(int, low=8, high=2048), default=None,
      help="training size in pixels, a multiple of 8 (default: the model's own: 512 for SD 1.5, 1024 for SDXL, "
      "64 for the toy model)")
    a("--flip", action="store_true", help="also train on mirrored copies of the photos")
    a("--random-crop", action="store_true", help="a random square of each photo every step, not its centre "
      "(each crop is encoded anew: slower)")
    a("--prior-weight", type=number(float, low=0, high=PRIOR_WEIGHT_MAX), default=None, help="λ, the weight of the "
      f"prior-preservation loss, at most {PRIOR_WEIGHT_MAX}; 0 turns it off (default: 1; 0 for textual-inversion, "
      "whose frozen model cannot drift)")
    a("--class-images", type=number(int, low=0, high=CLASS_IMAGES_MAX), default=None, help="how many prior images the "
      f"frozen model draws, at most {CLASS_IMAGES_MAX}; not with --class-dir, whose photos are all used (default: "
      f"{CLASS_IMAGES})")
    a("--class-dir", default=None, type=nonempty_path,
      help="use your own class photos from this folder instead of drawing them")
    a("--class-cache", default=str(cache_home() / "minidb" / "class-prior"), type=nonempty_path,
      help="where drawn prior images are cached as latents, shared between runs (default: %(default)s, under "
           "$XDG_CACHE_HOME where it is set)")
    a("--sample-steps", type=number(int, low=1, high=999), default=50,
      help="sampling steps of the prior, drift-watch and validation images, drawn with the model's own sampler "
           "(DDIM for SD 1.x/2.x, Euler for SDXL) (default: %(default)s)")
    a("--train-text-encoder", action="store_true", help="train the text encoder too (full), or adapters on it (lora)")
    a("--text-encoder-lr", type=number(float, above=0, high=1), default=None, help="learning rate of the text "
      "encoder or its adapters (--train-text-encoder), and of a new word (--new-token) (default: --lr; 5e-3 for a new word)")
    a("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
      help="autocast the UNet and text encoders; master weights stay fp32 (default: bf16 on CUDA GPUs that "
      "support it, else fp16; on the CPU bf16 where it is native (AVX512-BF16, AMX), else no; pass no for results "
      "equal to diffusers)")
    a("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, ~30%% slower; "
      "on a GPU, where a LoRA or new word's step is otherwise replayed as a CUDA graph, several times slower "
      "(the benchmark's SDXL LoRA step at 1024 px on an H200: 0.69 s, not 0.12 s)")
    a("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA only), saves ~5 GB")
    a("--snr-gamma", type=positive, default=None, help="min-SNR loss weighting with this γ (5 is typical), of the class prior's examples too, as kohya weights them (diffusers' DreamBooth scripts weight the subject's alone); off by default")
    a("--offset-noise", type=number(float, low=0, high=1), default=0.0, help="add per-channel offset noise of this scale (0.1 is typical) (default: %(default)s)")
    # (these three, left out, are the run's own on --resume: keep_the_runs_own; else RUN_DEFAULTS)
    a("--save-every", type=count, default=None, help="write a resumable checkpoint every N steps (0: only at the end) "
      "(default: 0)")
    a("--checkpoints-keep", type=number(int, low=1), default=None, help="how many of the latest checkpoints to keep "
      "(default: 1)")
    a("--validate-every", type=count, default=None, help="draw validation images every N steps (0: only at the end) "
      "(default: 0)")
    a("--validation-prompt", action="append", type=text, default=None, help="a prompt for the validation grid, "
      "besides the subject, the subject on the beach and the plain class prompt (the drift watch); repeatable")
    a("--validation-images", type=number(int, low=1, high=16), default=1,
      help="images per validation prompt, each with its own seed (default: %(default)s)")
    a("--drift-images", type=number(int, low=0, high=256), default=None, help="held-out class images (drawn by the "
      "frozen model, never trained on) whose prior loss is logged at each validation as the drift score (not for "
      "textual-inversion, whose model cannot drift); "
      f"0 turns it off (default: {DRIFT_IMAGES})")
    a("--save-dtype", choices=list(DTYPES), default=None, help="full only: dtype of the exported "
      "model (default: the base model's own, so the frozen parts come out bit-identical)")
    a("--seed", type=number(int, low=0, high=SEED_MAX), default=0, help="seed for everything random; same seed, same run (bitwise, on the CPU) (default: %(default)s)")
    a("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
      help="override the base model's detected prediction type (see below)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    args = p.parse_args(argv)
    folder = Path(args.resume) if args.resume and args.resume != "latest" and not args.resume.isdigit() else None
    if folder and (runs.is_run_folder(folder) or (folder / "checkpoints").is_dir()) \
            and not (folder / "state.pt").is_file():  # `--resume RUN`, a run's folder: as `--out RUN --resume`
        if args.out is not None and Path(args.out).resolve() != folder.resolve():
            fail(f"--resume {folder} is a run's folder, but --out names {args.out}; to continue that run pass "
                 f"--resume {folder} alone (or --out {folder} --resume), or leave --resume out to start a new run "
                 f"in {args.out}.")
        args.out, args.resume = str(folder), "latest"
    elif folder and args.out is None and (folder / "state.pt").is_file():  # a checkpoint continues its own run
        run = next((f.parent for f in folder.resolve().parents[:2] if f.name == "checkpoints"), None)  # RUN/
        if run is None:  # checkpoints/[abandoned/]step-N; not runs/latest, which may be another run of its settings
            fail(f"--resume {folder} is a checkpoint outside any run's folder, so which run it continues is not "
                 "known; name the run with --out RUN.")
        args.out = str(run)
    if args.resume:
        problem = keep_the_runs_own(p, argv, args)
        if problem:
            fail(problem)
    return args


def cache_home():
    """The user's cache folder: $XDG_CACHE_HOME where set (the freedesktop convention, which Hugging Face's
    cache follows too), else ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def resume_point(value):
    """An argparse type for --resume: not empty (which read as no --resume at all), and a path's names no longer
    than a file system holds."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty; give latest, a step number, a run's folder or a "
                                         "checkpoint folder")
    return nonempty_path(value)


METHOD_LR = {"full": 5e-6, "lora": 1e-4, "textual-inversion": 5e-3}  # the paper; kohya's and diffusers' LoRA
# and textual-inversion defaults
STEPS = 800
TOY_LR, TOY_STEPS = {"full": 1e-4}, {"full": 1200}  # the toy model's own: its 6.6 M-parameter UNet barely moves at
# the paper's 5e-6 (`python -m minidb.toy.lab tune`, on a held-out subject; docs/toy-world.md)
# Upper bounds, far past any recipe: past them a run only overflows (alpha/rank as a float32 scale, a loss
# weighted past fp32's range) or runs out of memory (the class prior is held in memory, its cache files
# are numbered with five digits), or run for weeks.
CLASS_IMAGES = 200  # about 200 prior images, as DESIGN.md reads the paper (~200 x N, N photos)
LORA_ALPHA_MAX, PRIOR_WEIGHT_MAX, CLASS_IMAGES_MAX, STEPS_MAX, BATCH_MAX = 10_000, 1_000, 100_000, 1_000_000, 1024
WORD_MAX = 200  # bytes of a new word, which names its file
DRIFT_IMAGES = 16
RUN_DEFAULTS = {"save_every": 0, "checkpoints_keep": 1, "validate_every": 0}  # None until a resume has kept the run's


def with_method_defaults(args, sdxl=False):
    """Fill in RUN_DEFAULTS that a resume has not taken from the run, refuse a flag that means nothing to
    --method, then fill in the method's own defaults (they are written into the run's settings). SDXL's method is LoRA unless asked: its full UNet with AdamW needs
    about 40 GB of GPU memory, its LoRA (as diffusers' and kohya's SDXL recipes train) a fraction.
    Returns a problem as one sentence, or None."""
    counted = args.class_images is not None and not args.resume  # (a resume's count is the run's own)
    if args.class_images is None and not args.class_dir:  # (--class-dir's photos are all used: no count)
        args.class_images = CLASS_IMAGES
    if (args.checkpoints_keep or 0) > 1 and not args.save_every and not args.resume:
        warnings.warn(f"--checkpoints-keep {args.checkpoints_keep} keeps the latest of the checkpoints that --save-every "
                      "writes, but without it the run writes one, at its end; add --save-every N, or leave "
                      "--checkpoints-keep out.")
    for key, value in RUN_DEFAULTS.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.method = args.method or ("lora" if sdxl else "full")
    for key, methods in METHOD_FLAGS.items():
        if getattr(args, key) not in (None, False) and args.method not in methods:
            what = "--method " + " or ".join(methods)
            return f"{runs.flag(key)} applies to {what} only, not to --method {args.method}; leave it out."
    if args.num_vectors is not None and args.method != "textual-inversion" and not args.new_token:
        return "--num-vectors sets the vectors of a new word; add --new-token, or use --method textual-inversion."
    toy = args.model is not None and Path(args.model).resolve() == TOY_MODEL.resolve()
    args.lr = args.lr or (toy and TOY_LR.get(args.method)) or METHOD_LR[args.method]
    args.steps = args.steps or (toy and TOY_STEPS.get(args.method)) or STEPS
    if args.prior_weight is None:
        args.prior_weight = 0.0 if args.method == "textual-inversion" else 1.0
    if args.drift_images and args.method == "textual-inversion" and not args.resume:
        warnings.warn(f"--drift-images {args.drift_images} does nothing for textual-inversion, whose model stays as it "
                      "was and cannot drift; leave it out.")
    args.drift_images = DRIFT_IMAGES if args.drift_images is None else args.drift_images
    if counted and args.prior_weight == 0:  # a warning, not a refusal: the toy lab's ablation gives its with- and
        # without-prior runs the same --train-args
        warnings.warn(f"--class-images {args.class_images} does nothing while the prior-preservation loss is off "
                      f"(--prior-weight 0{', as textual-inversion has it' if args.method == 'textual-inversion' else ''}"
                      "), so no class images are drawn; leave it out, or turn the prior on with --prior-weight.")
    if args.method == "lora":
        args.lora_rank = args.lora_rank or 16
        args.lora_alpha = args.lora_alpha or float(args.lora_rank)
    if args.method == "textual-inversion" or args.new_token:
        args.new_token, args.num_vectors = True, args.num_vectors or 1
    return None


def check(args):
    """Problems with the arguments found before any work starts, as one sentence; None if all is well."""
    if args.resume and args.resume != "latest" and not args.resume.isdigit() \
            and not (Path(args.resume) / "state.pt").is_file():  # (found only after the model had loaded)
        return NOT_A_RESUME_POINT.format(args.resume)
    if args.resume and args.out is None and not (runs.RUNS / "latest").is_dir():  # (before the subject, which a
        # resume takes from the run)
        return (f"--resume without --out continues {runs.RUNS / 'latest'}, which does not exist here; pass the "
                "run's folder, as --resume RUN or --out RUN --resume.")
    if args.resume and args.out is not None and not Path(args.out).is_dir():
        return f"--resume found no run in {args.out}, which does not exist; check the path, or start without --resume."
    if args.resume and args.concepts is None and (args.images is None) != (args.class_name is None):  # (the run's
        # subject is kept whole or given whole: keep_the_runs_own)
        given, other = ("--images", "--class") if args.images is not None else ("--class", "--images")
        return (f"--resume with {given} gives the run's subject anew, so it needs {other} too; leave {given} out to "
                "continue with the run's own subject.")
    if args.concepts is None and (args.images is None or args.class_name is None):
        return ("train.py needs the subject: --images FOLDER --class NAME (e.g. --images ./dog --class dog), "
                "or --concepts FILE for several subjects.")
    if args.concepts is not None and (args.images or args.class_name or args.identifier or args.instance_prompt
                                      or args.class_prompt):
        return ("--concepts names every subject with its own images, class, identifier and prompts; leave out "
                "--images, --class, --identifier, --instance-prompt and --class-prompt.")
    if args.concepts is not None and args.new_token:
        return ("--concepts trains one identifier per subject in the model; a new word (--new-token, "
                "textual-inversion) is learned for one subject per run, so train those one at a time.")
    problem = not args.resume and placeholder_problem(args.identifier, "--identifier")  # (a run begun so goes on)
    if problem:
        return problem
    word = args.identifier if args.new_token else None
    if word is not None and not can_be_a_new_word(word):  # what Tokenizer.add_word will require, checked before loading
        return (f"--identifier {word!r} must be one lower-case word to become a new word (prompts are read in lower "
                "case); spell it so, or leave --identifier out.")
    if word is not None and ("/" in word or "\\" in word or word.startswith(".")):
        return (f"--identifier {word!r} also names the new word's file, {word}.safetensors, so it cannot hold a slash "
                "or start with a dot; spell it without, or leave --identifier out.")
    if word is not None and len(word.encode()) > WORD_MAX:  # the file's temp name adds 26 bytes: past 255, no file
        return (f"--identifier {word[:20]}... is {len(word.encode())} bytes long, and it also names the new word's file "
                f"(WORD.safetensors), so it can be at most {WORD_MAX}; spell it shorter, or leave --identifier out.")
    try:
        model = hub.local_path(args.model)  # a Hub id: downloaded now, or one sentence why it cannot be
    except ModelFileError as e:
        return str(e)
    if not Path(model).exists():
        return how_to_get_weights() if Path(args.model) == Path(DEFAULT_MODEL) else \
            f"No model at {args.model}: pass a diffusers folder, a .safetensors / .ckpt file or a Hugging Face Hub " \
            "id (owner/name) to --model."
    if args.overwrite and args.out is not None and Path(model).resolve().is_relative_to(Path(args.out).resolve()):
        return (f"--model {args.model} lies inside --out {args.out}, which --overwrite deletes before the new run "
                "trains; copy the model out of that folder first, or choose another --out.")
    if args.steps and args.warmup_steps >= args.steps:  # the rate would climb for the whole run and never reach --lr
        warnings.warn(f"--warmup-steps {args.warmup_steps} is not shorter than the run (--steps {args.steps}), so "
                      f"the learning rate never reaches --lr {args.lr:g}; shorten the warm-up if that is not meant.")
    if args.resolution is not None and args.resolution % 8:
        return f"--resolution must be a multiple of 8 (the VAE works in 8x8 pixel cells), not {args.resolution}."
    if args.text_encoder_lr is not None and args.method == "textual-inversion":
        return "--text-encoder-lr: textual-inversion trains its new word alone, at --lr; set that instead."
    if args.text_encoder_lr is not None and not (args.train_text_encoder or args.new_token):
        return ("--text-encoder-lr sets the rate of a text encoder that --train-text-encoder trains, or of a new word "
                "(--new-token); add one of them, or leave it out.")
    if args.class_dir and args.prior_weight == 0:
        return ("--class-dir gives the prior-preservation loss its class photos, but the prior is off (--prior-weight 0"
                f"{', as textual-inversion has it' if args.method == 'textual-inversion' else ''}); turn it on with "
                "--prior-weight, or leave --class-dir out.")
    problem = class_dir_problem(args.class_dir, [args.images])  # --concepts' folders: once read (read_subjects)
    if problem:
        return problem
    if args.class_dir and args.class_images is not None and not args.resume:  # (a resume keeps the run's count)
        return (f"--class-images {args.class_images} sets how many prior images the model draws, but --class-dir "
                "gives them as photos, all of which are used; leave one of the two out.")
    if args.prior_weight > 0 and not args.class_dir and args.class_images == 0:
        return ("--class-images 0 leaves the prior-preservation loss without images; draw at least 1 (the paper "
                "draws about 200), or turn the prior off with --prior-weight 0.")
    problem = check_device(args.device)
    if problem:
        return problem
    if args.mixed_precision == "fp16" and not args.device.startswith("cuda"):
        return "--mixed-precision fp16 needs a CUDA GPU; on the CPU use no or bf16."
    if args.prior_weight > 0 and not args.class_dir and args.out is not None \
            and Path(args.class_cache).resolve().is_relative_to(Path(args.out).resolve()):
        return (f"--class-cache {args.class_cache} is inside --out {args.out}, the run's own folder, which holds only "
                "what the run writes (and --overwrite empties); put the cache elsewhere, or leave --class-cache out.")
    if args.prior_weight > 0 and not args.class_dir:
        try:
            Path(args.class_cache).mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=args.class_cache).close()
        except OSError as e:
            return f"Cannot write the class-prior cache to --class-cache {args.class_cache} ({e.strerror}); choose another folder."
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "--use-8bit-adam needs bitsandbytes (pip install bitsandbytes, CUDA only); or leave the flag off."
    if args.out is not None and Path(args.out).suffix.lower() in WEIGHT_SUFFIXES \
            and not Path(args.out).is_dir():
        return (f"--out {args.out} looks like a model file's name, but --out is the run's folder (the model is "
                f"written into it, as model.safetensors and more); pass a folder, such as --out "
                f"{Path(args.out).parent / Path(args.out).stem}.")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file, not a folder; choose a folder."
    return None
