"""The toy lab: train a small text-to-image model on the toy world, and measure DreamBooth in it.

    python -m minidb.toy.lab examples             # render the subject's photos into examples/two-tone-cup/
    python -m minidb.toy.lab train-base           # the base model -> weights/toy.safetensors (~1 h 30 min, 2 cores)
    python -m minidb.toy.lab train-probe          # the measuring probe -> weights/toy-probe.safetensors
    python -m minidb.toy.lab base                 # how well the base model draws, and a grid of its samples
    python -m minidb.toy.lab tune                 # the DreamBooth learning rate, swept on the tuning subject only
    python -m minidb.toy.lab evaluate --model M   # the paper's metrics for a model, as a table
    python -m minidb.toy.lab ablation             # DreamBooth with vs without the prior loss, several seeds
    python -m minidb.toy.lab methods              # DreamBooth full vs LoRA vs textual inversion, several seeds

The base model and its training are in minidb/toy/base.py, the measuring probe in probe.py, and the
metrics it reads in measure.py.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C in the seconds torch takes to import: a sentence, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted.", file=sys.stderr), os._exit(130)))

import json
import math
import random
import shlex
import subprocess
from pathlib import Path

import torch
from PIL import Image

from minidb.cli import Terminated, fail, run
from minidb.data import DataError
from minidb.dreambooth import pick_identifier
from minidb.fetch import file_in_the_way
from minidb.files import ModelFileError
from minidb.writes import write_safetensors
from minidb.load import load
from minidb.pipeline import bf16_for_autocast, decode, grid, sample_latents
from minidb.runs import CHECKPOINT, RunError, log_rows, recorded_identifiers, saved_settings
from minidb.tokenizer import Tokenizer
from minidb.toy.arguments import check_outputs, parse_args
from minidb.toy.base import SIZE, to_tensor, train_base
from minidb.toy.measure import PLACES, evaluate, evaluate_base, load_probe, mean_spread, no_nan
from minidb.toy.probe import accuracy, train_probe
from minidb.toy.world import BACKGROUNDS, CLASSES, SUBJECT, TUNING_SUBJECT, caption, subject_photos

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "examples" / "two-tone-cup"


def run_base(args):
    metrics, picture = evaluate_base(load(args.model, dtype=torch.float32), load_probe(args.probe), args.n, args.steps)
    print_table({Path(args.model).name: metrics})
    picture.resize((picture.width * 2, picture.height * 2), 0).save(args.picture)
    print(f"wrote {args.picture} (rows: {', '.join(CLASSES)}; columns: {', '.join(BACKGROUNDS)})")


def run_settings(folder, what_to_do):
    """A train.py run's settings.json as a dict, or RunError: one sentence naming the file and `what_to_do`."""
    settings = saved_settings(Path(folder))  # {} when missing or unreadable
    if not isinstance(settings.get("identifier"), str) or not settings["identifier"]:
        raise RunError(f"{Path(folder) / 'settings.json'} does not name the run's identifier (it is damaged, or not "
                       f"the settings train.py wrote); {what_to_do}.")
    return settings


def identifier_of(model_path):
    """The identifier a train.py run used (its settings.json, or the record its model file keeps, also when
    converted by info --convert), else the one train.py picks at --seed 0."""
    folder = Path(model_path).resolve().parent
    if (folder / "settings.json").is_file():
        return run_settings(folder, "pass the identifier with --identifier")["identifier"]
    recorded = recorded_identifiers([model_path])
    return recorded[0] if len(recorded) == 1 else pick_identifier(Tokenizer.for_version("SD 1.x"), random.Random(0))


def print_table(columns):
    metrics = list(next(iter(columns.values())))
    print("| metric | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for m in metrics:
        print(f"| {m} | " + " | ".join(f"{c[m][0]:.3f} ± {c[m][1]:.3f}" for c in columns.values()) + " |")


@torch.no_grad()
def run_evaluate(args):
    probe = load_probe(args.probe)
    columns, tiles = {}, []
    for path in args.model:
        identifier = args.identifier or identifier_of(path)
        model = load(path, dtype=torch.float32)
        if args.bf16:  # as sample.py: convolution and linear weights in bf16, the rest fp32, under bf16 autocast
            for part in (model.text_encoder, model.unet, model.vae):
                bf16_for_autocast(part)
        columns[f"{Path(path).parent.name}/{Path(path).name} [{identifier}]"] = evaluate(
            model, identifier, probe, n=args.n, steps=args.steps, seed=args.seed, placed_images=tiles, bf16=args.bf16)
    print_table(columns)
    if args.picture:
        picture = grid(tiles, cols=args.n)
        picture.resize((picture.width * 2, picture.height * 2), 0).save(args.picture)
        print(f"wrote {args.picture} (a row per model and place: {', '.join(PLACES.values())}; a column per seed)")


def run_train_probe(args):
    vae = load(args.model, dtype=torch.float32).vae
    probe = train_probe(to_tensor, vae=vae, steps=args.steps, seed=args.seed)
    write_safetensors(args.out, probe.state_dict())
    with torch.no_grad():
        for vae_or_none, what in ((None, "fresh pictures"), (vae, "the same after a VAE round trip")):
            right = accuracy(probe, to_tensor, vae=vae_or_none)
            print(f"{what}: " + ", ".join(f"{head} {share:.3f}" for head, share in right.items()))
    print(f"wrote {args.out}")


VARIANTS = {  # what each comparison trains, as train.py arguments
    "ablation": {"with prior": [], "without prior": ["--prior-weight", "0"]},  # the paper's Table 3
    "methods": {"DreamBooth": [], "DreamBooth LoRA": ["--method", "lora"],  # its Table 1, with LoRA
                "Textual Inversion": ["--method", "textual-inversion"]},
}  # and "tune", the toy recipe: one variant per --lrs rate, on the tuning subject only (a ball), never the cup
TUNING_EXAMPLES = ROOT / "runs" / "tuning-subject"  # rendered on demand: the tuning subject's 5 photos
# train.py flags the lab sets itself, each with the lab's option for it (None: it has none), besides each variant's
# own (VARIANTS; tune's --lr is --lrs). Given in --train-args too, argparse would take the later one: a run outside
# the sweep's folder, of another seed, or with another variant's setting.
LAB_FLAGS = {"--images": None, "--class": None, "--model": "--model", "--out": "--out", "--seed": "--seeds",
             "--resume": None, "--overwrite": None}


def train_py_args(args):
    """--train-args split as a shell splits it (a quoted prompt stays one word); refused in one sentence if it
    cannot be split, or if it sets a flag the lab sets: by its name, a prefix argparse takes for it, or with =."""
    try:
        words = shlex.split(args.train_args)
    except ValueError as e:  # "No closing quotation", "No escaped character"
        fail(f"--train-args {args.train_args} cannot be split as a shell splits it ({str(e).lower()}); quote as in "
             "a shell, e.g. --train-args \"--instance-prompt 'a photo of a [V] cup'\".")
    own = {**LAB_FLAGS, **({"--lr": "--lrs"} if args.command == "tune" else
                           {w: None for extra in VARIANTS[args.command].values() for w in extra if w[:2] == "--"})}
    for word in words:
        name = word.split("=", 1)[0]  # --out=x, --ou x and --ou=x all mean --out x to argparse
        flag = next((f for f in own if f.startswith(name)), None) if name[:2] == "--" and name != "--" else None
        if flag:
            fail(f"--train-args {word} sets train.py's {flag}, which the lab sets itself; "
                 + (f"use the lab's {own[flag]} instead." if own[flag] else "leave it out."))
    return words


def load_run(folder):
    """(model, identifier) of a train.py run, whatever its method: its exported model, or the base model
    with the run's LoRA merged and its new word attached."""
    from minidb.dreambooth import NewWord
    from minidb.lora_files import merge_lora
    folder = Path(folder)
    settings = run_settings(folder, f"delete {folder} so that the next run trains it again")
    full = settings.get("method", "full") == "full"
    model = load(folder / "model.safetensors" if full else settings["model"], dtype=torch.float32)
    if (folder / "lora.safetensors").exists():
        merge_lora(model, folder / "lora.safetensors")
    word = folder / f"{settings['identifier']}.safetensors"
    if word.exists():
        NewWord.from_file(model, word).attach(model.text_encoder)
    return model, settings["identifier"]


@torch.no_grad()
def run_compare(args):
    """A table of the paper in miniature: each variant trained on the subject for several seeds, each
    run exactly as a user would type it, then measured. Finished runs (README.md written) are reused."""
    tuning = args.command == "tune"
    train_args = train_py_args(args)  # before any work
    variants = {f"lr {lr}": ["--lr", lr] for lr in args.lrs} if tuning else VARIANTS[args.command]
    images, cls = ((write_examples(Path(args.out) / "tuning-subject", tuning=True), TUNING_SUBJECT) if tuning
                   else (EXAMPLES, SUBJECT))  # the tuning photos go with the sweep's runs, not into the repo's runs/
    probe, runs, seconds, drift = load_probe(args.probe), *({name: [] for name in variants} for _ in range(3))
    for seed in args.seeds:
        for name, extra in variants.items():
            out = Path(args.out) / f"{name.lower().replace(' ', '-')}-seed{seed}"
            if not (out / "README.md").exists():  # an unfinished run continues from its checkpoint, or starts over
                again = (["--resume"] if any((out / "checkpoints").glob(CHECKPOINT)) else
                         ["--overwrite"] if out.exists() else [])
                try:
                    train_py([sys.executable, str(ROOT / "train.py"), "--images", str(images), "--class", cls, "--model",
                              str(args.model), "--out", str(out), "--seed", str(seed), *train_args, *extra,
                              *again])
                except subprocess.CalledProcessError as e:  # resuming with other --train-args is refused by train.py
                    if again != ["--resume"]:
                        raise
                    raise RunError(f"train.py stopped with exit code {e.returncode} while resuming {out}; fix what it "
                                   f"says above, or delete {out} to train that run over.") from None
            runs[name].append(out)
            log = [row for _, row in log_rows(out / "log.jsonl") if isinstance(row.get("step_time"), (int, float))]
            if not log:  # a finished run's log, deleted or damaged: its time and drift score are lost
                raise RunError(f"{out / 'log.jsonl'} holds no rows of training (it is missing or damaged); delete {out} "
                               "so that the next sweep trains it again.")
            seconds[name].append(sum(row["step_time"] for row in log))
            drift[name].append([row for row in log if row.get("drift") is not None][-1:])  # train.py's last figure
    base = load(args.model, dtype=torch.float32)
    identifier = load_run(runs[next(iter(variants))][0])[1]
    columns = {"base model": evaluate(base, identifier, probe, n=args.n, steps=args.steps, tuning=tuning)}
    per_seed = {name: [evaluate(*load_run(folder), probe, n=args.n, steps=args.steps, tuning=tuning)
                       for folder in folders] for name, folders in runs.items()}
    for name, results in per_seed.items():  # mean over seeds, spread = std of the per-seed means
        for result, rows in zip(results, drift[name]):  # train.py's drift score (held-out prior loss), beside PRES
            result["drift score"] = (rows[0]["drift"] if rows else float("nan"), 0.0)
        columns[name] = {m: mean_spread([r[m][0] for r in results]) for m in results[0]}
        columns[name]["training loop, s"] = mean_spread(seconds[name])
    bases = [rows[0]["drift_base"] for rows in sum(drift.values(), []) if rows]
    columns["base model"]["drift score"] = (bases[0], 0.0) if bases else (float("nan"), 0.0)
    columns["base model"]["training loop, s"] = (0.0, 0.0)
    runs_all = [r for results in per_seed.values() for r in results  # does train.py's number track the probe's?
                if math.isfinite(r["drift score"][0])]  # (textual inversion's frozen model logs no drift)
    tracking = torch.corrcoef(torch.tensor([[r["PRES"][0] for r in runs_all], [r["drift score"][0] for r in runs_all]],
                                           dtype=torch.float64))[0, 1].item() if len(runs_all) > 2 else None
    print(f"\n{len(args.seeds)} seeds, {args.n} images per prompt; spread = std over seeds (base: over images)\n")
    print_table(columns)
    if tracking is not None:
        print(f"\ntrain.py's drift score against the probe's PRES, over all {len(runs_all)} runs: Pearson r = {tracking:.3f}")
    contrast = {}
    if len(variants) == 2:  # the ablation: is the difference of the means larger than either spread?
        (a, b) = (columns[name] for name in variants)
        contrast = {m: {"difference": a[m][0] - b[m][0], "larger spread": max(a[m][1], b[m][1]),
                        "beyond the spread": abs(a[m][0] - b[m][0]) > max(a[m][1], b[m][1])} for m in a}
        print(f"\n| metric | {' - '.join(variants)} | larger spread | difference beyond the spread |\n|---|---|---|---|")
        for m, c in contrast.items():
            print(f"| {m} | {c['difference']:+.3f} | {c['larger spread']:.3f} | {'yes' if c['beyond the spread'] else 'no'} |")
    Path(args.json).write_text(json.dumps(no_nan({"columns": columns, "per_seed": per_seed, "contrast": contrast,
                                           "drift score vs PRES, Pearson r": tracking,
                                           "seeds": args.seeds, "train_args": args.train_args, "variants": variants}),
                                          indent=2) + "\n")
    # a picture: the base, then each variant (seed of the first run), on a few prompts
    prompts = [f"a photo of a {identifier} {cls} on the beach", f"a photo of a {identifier} {cls} on the snow",
               f"a photo of a red {identifier} {cls}", f"a photo of a {cls}", f"a photo of a {cls} on the grass"]
    models = [base] + [load_run(folders[0])[0] for folders in runs.values()]
    tiles = [decode(m, sample_latents(m, prompt.replace(identifier, ident), steps=args.steps, seed=1, height=SIZE,
                                      width=SIZE, progress=False))[0]
             for m, ident in zip(models, [identifier] + [load_run(f[0])[1] for f in runs.values()]) for prompt in prompts]
    Path(args.picture).parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, cols=len(prompts)).resize((len(prompts) * 128, len(models) * 128), 0).save(args.picture)
    print(f"wrote {args.json} and {args.picture} (rows: base, {', '.join(variants)}; columns: {prompts})")


GRACE = 300  # seconds a train.py stopped by Ctrl-C gets to finish its step and save its checkpoint


def train_py(cmd):
    """Run train.py as a user would. A Ctrl-C from the terminal reaches it too (it signals the whole process
    group), and train.py then finishes its step and saves a checkpoint, which the next sweep resumes: wait for
    that, rather than kill it 0.25 s later as subprocess.run does. A second Ctrl-C stops it at once."""
    print(shlex.join(cmd))
    child = subprocess.Popen(cmd)
    try:
        code = child.wait()
    except KeyboardInterrupt as stop:
        if isinstance(stop, Terminated):  # `kill` reaches the lab alone (a terminal's Ctrl-C reaches both): pass it on
            child.send_signal(signal.SIGTERM)
        print("waiting for train.py to save its checkpoint (press Ctrl-C again to stop it at once)", file=sys.stderr)
        try:
            child.wait(timeout=GRACE)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            child.kill()
            child.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def write_examples(out, tuning=False):
    """Render the subject's (or the tuning subject's) five photos into `out`; return it. A folder holding anything
    else (a user's own 0.png too) is refused, which would be overwritten or trained on with them; the same
    photos, written before, may be written again."""
    out = Path(out)
    photos = {f"{i}.png": photo for i, photo in enumerate(subject_photos(n=5, tuning=tuning))}
    same = {p.name for p in out.iterdir() if p.name in photos and same_picture(p, photos[p.name][0])} \
        if out.is_dir() else set()
    others = [p.name for p in sorted(out.iterdir()) if p.name not in same and not p.name.startswith(".")] \
        if out.is_dir() else []  # hidden files (.DS_Store) are no photos to train.py either
    if others:
        fail(f"{out} holds files that are not the {'tuning ' if tuning else ''}subject's five photos "
             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); choose a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    for name, (image, scene) in photos.items():
        if name not in same:  # the same picture is left as it is
            image.save(out / name)
        print(f"{'kept' if name in same else 'wrote'} {out / name}: {caption(scene, identifier='[V]')}")
    return out


def same_picture(path, image):
    """Whether `path` is a picture of exactly `image`'s pixels (its bytes may differ by PIL's version)."""
    if not path.is_file() or path.is_symlink():  # not a pipe, which would block the reading
        return False
    try:
        with Image.open(path) as old:
            return old.mode == image.mode and old.size == image.size and old.tobytes() == image.tobytes()
    except (OSError, ValueError, Image.DecompressionBombError):  # not a picture, or a damaged one
        return False


def main(argv=None):
    args = parse_args(argv, __doc__.split("\n\n")[0])
    command = {"examples": lambda a: write_examples(a.out or (TUNING_EXAMPLES if a.tuning else EXAMPLES), a.tuning), "train-base": train_base, "base": run_base,
               "train-probe": run_train_probe, "evaluate": run_evaluate, "ablation": run_compare, "methods": run_compare,
               "tune": run_compare}[args.command]
    try:
        check_outputs(args)  # before any work: an output that fails only at the end wastes it
        command(args)
    except (ModelFileError, DataError, RunError) as e:  # a model, probe or run folder that cannot be used
        fail(str(e))
    except subprocess.CalledProcessError as e:  # train.py has printed its own error above
        fail(f"train.py stopped with exit code {e.returncode}; fix what it says above and run again.")
    except OSError as e:  # a path given here that cannot be read or written
        blocker = file_in_the_way(e)
        fail(f"{blocker} is a file, not a folder; choose another path." if blocker else
             f"{e.filename or 'a file'}: {e.strerror or e}; check the path, and that it can be written.")


if __name__ == "__main__":
    run(main, interrupted="interrupted: run the same command again to continue (train-base with --resume).")
