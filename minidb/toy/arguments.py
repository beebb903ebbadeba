"""The toy lab's command line (`python -m minidb.toy.lab`, minidb/toy/lab.py): its commands and their
flags. Every value is checked before any work starts, as train.py's are: a count has an upper bound far
above what the lab uses, so that a slip of the keyboard is refused at once rather than failing to
allocate (or running for days) later, and an output that could only fail at the end is refused first."""

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from minidb.cli import SEED_MAX, fail, nonempty_path, number, text
from minidb.fetch import TOY_MODEL
from minidb.files import json_loads, read_metadata, tensor_names
from minidb.toy.base import TOY_TEXT, TOY_UNET, TOY_VAE
from minidb.toy.measure import TOY_PROBE
from minidb.toy.probe import Probe

ROOT = Path(__file__).resolve().parent.parent.parent
STEPS = number(int, low=1, high=1_000_000)  # training steps (train.py's limit too)
SAMPLE_STEPS = number(int, low=1, high=999)  # DDIM steps: SD's 1000 timesteps, "leading" spacing (schedulers.py)
SEED = number(int, low=0, high=SEED_MAX)  # torch.Generator takes 64 bits (minidb/cli.py)
N = number(int, low=1, high=64)  # images per prompt: 16 times the default, about an hour on 2 cores
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp")


def rate(value):
    """--lrs: a rate above 0 and at most 1 (train.py's bounds), kept as typed: it names the run's folder and
    passes to train.py --lr."""
    number(above=0, high=1)(value)
    return value


def vae_width(value):
    """--vae-ch: a multiple of 32, since the VAE's GroupNorm splits channels into 32 groups; at most 256, four
    times the toy VAE's (at 512 a step took 7 GB and 4 minutes on 2 cores)."""
    ch = number(int, low=32, high=256)(value)
    if ch % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (the VAE's 32 norm groups), not {value}")
    return ch


def check_outputs(args):
    """Refuse, before any work, an output that could only fail once the work is done: a picture without a
    picture's extension, a file where a folder exists, a folder that cannot be made or written, a model
    train-base or train-probe would misname or write over (model_out_problem). The folders the files go into are
    made now."""
    problem = args.command in MODEL_OUTS and model_out_problem(args.command, Path(args.out))
    if problem:  # before its folder is made
        fail(problem)
    outputs = {"--out": args.out if args.command in ("train-base", "train-probe") else None,
               "--json": getattr(args, "json", None), "--picture": getattr(args, "picture", None)}
    for flag, path in ((f, Path(p)) for f, p in outputs.items() if p):
        if flag == "--picture" and path.suffix.lower() not in IMAGE_TYPES:
            fail(f"--picture {path} does not end in a picture's extension ({', '.join(IMAGE_TYPES)}); add one.")
        if path.is_dir():
            fail(f"{flag} {path} is a folder; give a file name in it.")
        path.parent.mkdir(parents=True, exist_ok=True)  # an OSError here is a sentence too (main)
        if not os.access(path.parent, os.W_OK):
            fail(f"{flag} {path} cannot be written (the folder {path.parent} is not writable); choose another path.")


def model_out_problem(command, out):
    """Why train-base or train-probe must not write its file to `out`, or None: each writes safetensors (under
    another name every tool misreads it), and replaces only a file of its own kind, such as its default."""
    if out.is_dir():
        return None  # check_outputs says so
    if out.suffix.lower() != ".safetensors":
        return (f"--out {out} does not end in .safetensors, and {command} writes a safetensors file; name it "
                f"{out.with_suffix('.safetensors')}.")
    kind, is_kind = MODEL_OUTS[command]
    if out.exists() and not is_kind(out):
        return (f"--out {out} is a file that is not {kind} (a LoRA, a trained model or another file), "
                f"which {command} does not replace; choose another --out.")
    return None


def is_toy_base(path):
    """Whether `path` is a model as train-base writes one, read from its header: minidb's configs of the toy UNet
    and text encoder (the VAE's width is --vae-ch's), and no train.py run's record (a DreamBooth model has one)."""
    metadata = read_metadata(path)  # {} for a file that is not safetensors
    try:
        configs = json_loads(metadata.get("minidb", "null"))
    except json.JSONDecodeError:
        return False
    toy = json.loads(json.dumps({"unet": asdict(TOY_UNET), "text_encoder": asdict(TOY_TEXT)}))  # tuples as lists
    return set(metadata) == {"format", "minidb"} and isinstance(configs, dict) and all(
        configs.get(part) == config for part, config in toy.items())


def is_probe(path):
    """Whether `path` holds a probe's tensors, by name, read from its header: what train-probe writes."""
    return tensor_names(path) == set(Probe().state_dict())


MODEL_OUTS = {"train-base": ("a toy base model", is_toy_base), "train-probe": ("a toy probe", is_probe)}


def parse_args(argv, description):
    p = argparse.ArgumentParser(prog="python -m minidb.toy.lab", description=description)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, about):  # the command's line in the lab's --help, and the first line of its own
        return sub.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".")

    ex = add("examples", "render the subject's photos")
    ex.add_argument("--out", type=nonempty_path, default=None, help="folder for the five photos (default: "
                    "examples/two-tone-cup, or runs/tuning-subject with --tuning)")
    ex.add_argument("--tuning", action="store_true", help="the tuning subject's photos instead of the shipped subject's")
    base = add("train-base", "train the toy base model from scratch")
    base.add_argument("--out", type=nonempty_path, default=str(TOY_MODEL),
                      help="where to write the model (default: %(default)s)")
    base.add_argument("--work", type=nonempty_path, default="runs/toy-base",
                      help="folder for the checkpoints that --resume continues from (default: %(default)s)")
    base.add_argument("--resume", action="store_true", help="continue the interrupted run in --work")
    base.add_argument("--overwrite", action="store_true", help="start over, removing the run in --work (a "
                      "folder that holds anything but a train-base run is refused, never cleared)")
    base.add_argument("--save-every", type=STEPS, default=100, help="steps between checkpoints (default: %(default)s)")
    base.add_argument("--steps", type=STEPS, default=6000, help="stage 2: UNet steps (default: %(default)s)")
    base.add_argument("--pictures", type=number(int, low=1, high=200_000), default=20000,  # 1.6 GB of latents
                      help="stage 2: fixed world pictures, encoded once (default: %(default)s)")
    base.add_argument("--vae-steps", type=STEPS, default=3000, help="stage 1: VAE training steps (default: %(default)s)")
    base.add_argument("--batch", type=number(int, low=1, high=256), default=32,  # 3 GB a step at 256
                      help="stage 2: pictures per UNet step (default: %(default)s)")
    base.add_argument("--lr", type=number(above=0, high=1), default=1.5e-3,  # train.py's bounds
                      help="UNet stage peak learning rate (default: %(default)s)")
    base.add_argument("--vae-varied", type=number(low=0, high=1), default=0.5,
                      help="stage 1: share of its pictures with two-colour paint jobs, which the captioned world "
                           "never has, so that patterned subjects survive the VAE (default: %(default)s)")
    base.add_argument("--vae-ch", type=vae_width, default=TOY_VAE.ch,
                      help="stage 1: the VAE's channels at full resolution, a multiple of 32 (default: %(default)s)")
    base.add_argument("--vae-from", type=nonempty_path, default=None,
                      help="skip stage 1: take the VAE of a model trained earlier")
    base.add_argument("--seed", type=SEED, default=0, help="seed for the world's pictures and the weights (default: %(default)s)")
    pr = add("train-probe", "train the measuring probe on the world")
    pr.add_argument("--model", type=nonempty_path, default=str(TOY_MODEL),
                    help="the model whose VAE softens half the training pictures, as drawn pictures are "
                         "(default: %(default)s)")
    pr.add_argument("--out", type=nonempty_path, default=str(TOY_PROBE),
                    help="where to write the probe (default: %(default)s)")
    pr.add_argument("--steps", type=STEPS, default=3000, help="training steps (default: %(default)s)")
    pr.add_argument("--seed", type=SEED, default=0, help="seed for its pictures and weights (default: %(default)s)")
    ev = add("evaluate", "subject fidelity, prompt fidelity, PRES, DIV of models")
    ev.add_argument("--model", type=nonempty_path, nargs="+", default=[str(TOY_MODEL)],
                    help=f"one or more models, compared side by side (default: the toy base model, {TOY_MODEL})")
    ev.add_argument("--identifier", type=text, default=None, help="the [V] token (default: from the settings.json "
                    "of the run beside each model, or the record its file keeps; else the token train.py picks at "
                    "--seed 0)")
    ev.add_argument("--probe", type=nonempty_path, default=str(TOY_PROBE),
                    help="the measuring probe (default: %(default)s)")
    ev.add_argument("--n", type=N, default=4, help="images per prompt (default: %(default)s)")
    ev.add_argument("--steps", type=SAMPLE_STEPS, default=25, help="DDIM steps (default: %(default)s)")
    ev.add_argument("--seed", type=SEED, default=0, help="seed of the sampling noise; each prompt uses its own offset "
                    "from it (default: %(default)s)")
    ev.add_argument("--picture", type=nonempty_path, default=None,
                    help="also write the subject's generations in each place, as a grid")
    ev.add_argument("--bf16", action="store_true", help="sample under bf16 autocast, as sample.py does by default "
                    "on a CPU with native bf16 (the probe still reads in fp32)")
    bs = add("base", "how well the base model draws the world: class, colour, place, smears")
    bs.add_argument("--model", type=nonempty_path, default=str(TOY_MODEL), help="the base model (default: %(default)s)")
    bs.add_argument("--probe", type=nonempty_path, default=str(TOY_PROBE),
                    help="the measuring probe (default: %(default)s)")
    bs.add_argument("--n", type=N, default=8, help="images per prompt (default: %(default)s)")
    bs.add_argument("--steps", type=SAMPLE_STEPS, default=25, help="DDIM steps (default: %(default)s)")
    bs.add_argument("--picture", type=nonempty_path, default=str(ROOT / "docs" / "toy-base-samples.png"),
                    help="a grid of samples, one per class and background (default: %(default)s, the picture "
                         "docs/toy-world.md shows, which this replaces)")
    helps = {"ablation": "DreamBooth with vs without the prior loss, several seeds, measured (the paper's Table 3)",
             "methods": "DreamBooth full, LoRA and textual inversion, several seeds, measured (its Table 1)",
             "tune": "the toy DreamBooth recipe: a learning-rate sweep on the tuning subject only"}
    for name, about in helps.items():
        ab = add(name, about)
        ab.add_argument("--model", type=nonempty_path, default=str(TOY_MODEL),
                        help="the base model (default: %(default)s)")
        ab.add_argument("--probe", type=nonempty_path, default=str(TOY_PROBE),
                        help="the measuring probe (default: %(default)s)")
        ab.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1] if name == "tune" else [0, 1, 2, 3, 4],
                        help="train.py --seed of each set of runs (default: %(default)s)")
        ab.add_argument("--train-args", default="", help="extra train.py arguments, e.g. '--steps 400'")
        if name == "tune":
            ab.add_argument("--lrs", nargs="+", default=["5e-6", "2e-5", "5e-5", "1e-4", "2e-4"], type=rate,
                            help="the learning rates to sweep (default: %(default)s)")
        ab.add_argument("--out", type=nonempty_path, default=f"runs/{name}",
                        help="folder for the runs; finished ones are reused (default: %(default)s)")
        ab.add_argument("--n", type=N, default=4, help="images per prompt (default: %(default)s)")
        ab.add_argument("--steps", type=SAMPLE_STEPS, default=25, help="DDIM steps (default: %(default)s)")
        ab.add_argument("--json", type=nonempty_path, default=str(ROOT / "bench" / f"toy-{name}.json"),
                        help="where to write the measurements (default: %(default)s, the numbers docs/toy-world.md "
                             "cites, which this replaces)")
        ab.add_argument("--picture", type=nonempty_path, default=str(ROOT / "docs" / f"toy-{name}.png"),
                        help="where to write the picture (default: %(default)s, the one docs/toy-world.md shows, "
                             "which this replaces)")
    return p.parse_args(argv)
