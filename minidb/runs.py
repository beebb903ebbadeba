"""The run folder of train.py: where a run lives, who may write to it, and how it resumes.

- Without --out, every run gets a fresh numbered folder (runs/dreambooth-1, -2, ...) and the link
  runs/latest points at the newest one, so the same command works twice in a row.
- A lock file: two runs never write into one folder.
- What a folder holds decides what a new run may do with it: nothing (start), a run with a
  checkpoint (--resume, or --overwrite), a run that died before its first checkpoint (--overwrite),
  or files that are not a run (never touched).
- --resume continues the run exactly as it started: a flag that would change the run is refused, and
  the model and the steps, when left out, are the run's own rather than today's defaults.
- Checkpoints are written beside the previous one and swapped in by renames, so at every instant
  one complete checkpoint exists.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from minidb.files import (ModelFileError, atomic_write, first_non_finite, fsync, read_metadata, read_tensors,
                          write_pickle, write_safetensors)

RUNS = Path("runs")
# Everything a run writes into its folder (hidden names are temporary files and the lock).
RUN_FILES = {"checkpoints", "validation", "log.jsonl", "settings.json", "loss.png", "model", "model.safetensors",
             "lora.safetensors", "README.md"}  # and the new word's embedding, IDENTIFIER.safetensors
# Flags that may change on --resume: how long to train, and how often to save and look.
RESUMABLE_CHANGES = {"steps", "save_every", "validate_every", "resume", "overwrite", "out", "class_cache",
                     "checkpoints_keep", "validation_prompt", "validation_images"}
PATH_FLAGS = {"images", "model", "class_dir", "concepts"}
DERIVED = {"identifier", "instance_prompt", "class_prompt", "resolution", "mixed_precision", "base_version",
           "prediction_type"}
FLAG_NAMES = {"class_name": "--class"}


class RunError(Exception):
    """A run folder that cannot be used as asked. The message is one sentence for the user."""


def flag(key):
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


# ---- where a run lives ----

def new_run_folder(root=RUNS, name="dreambooth"):
    """The first free root/name-N, and root/latest pointing at it."""
    n = 1
    while (root / f"{name}-{n}").exists():
        n += 1
    folder = root / f"{name}-{n}"
    folder.mkdir(parents=True)
    point_latest(root, folder)
    return folder


def run_folder(out, resume):
    """The folder a run writes to: `out` (--out) if given, runs/latest on --resume, else a new
    runs/dreambooth-N; made, and checked writable."""
    if out is not None:
        folder = Path(out)
    elif resume:
        folder = (RUNS / "latest").resolve()
    else:
        folder = new_run_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise RunError(f"Cannot write to --out {folder} ({e.strerror}); choose another folder.") from None
    return folder


def point_latest(root, folder):
    """Make root/latest a link to `folder`, replacing the old link atomically."""
    tmp = root / ".latest.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, root / "latest")
    except OSError:  # no symlinks here (e.g. Windows without developer mode): the folder is printed anyway
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(folder):
    """Hold an exclusive lock on folder/.lock while the run writes there. The operating system lets
    go of it when the process ends, however it ends, so a killed run never leaves a stale lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not guarded there
        yield
        return
    f = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise RunError(f"Another train.py (process {pid}) is running in {folder}; wait for it to finish, "
                           "or choose another --out.") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def check_folder(folder, resume, overwrite):
    """Refuse a folder the run may not use as asked. (What --overwrite deletes is deleted later, by
    clear(), once the new run has loaded its model and photos: a bad new input must not cost the old run.)"""
    if resume and overwrite:
        raise RunError("--resume continues a run and --overwrite deletes it; pass one of them.")
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    # A run writes settings.json before its first step; without it, even familiar names are not ours.
    ours = RUN_FILES | {f"{_saved(folder).get('identifier')}.safetensors"}
    foreign = [name for name in entries if name not in ours or "settings.json" not in entries]
    if foreign:
        raise RunError(f"--out {folder} holds files that are not a minidb run ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder.")
    state = latest_state(folder / "checkpoints")
    if overwrite:
        return
    if resume and state is None:
        raise RunError(f"--resume found no checkpoint in {folder}; to start over there, run without --resume "
                       "and with --overwrite.")
    elif not resume and state is not None:
        raise RunError(f"--out {folder} holds a run with a checkpoint at step {int(state.name[5:])}; pass --resume "
                       "to continue it, --overwrite to delete it and start over, or choose another --out.")
    elif not resume and entries:
        raise RunError(f"--out {folder} holds a run that stopped before its first checkpoint; pass --overwrite "
                       "to delete it and start over, or choose another --out.")


def clear(folder):
    """Delete the run in `folder` for --overwrite, which check_folder found to be a run (the lock stays)."""
    for path in folder.iterdir():
        if not path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _saved(folder):
    """The run's settings.json as a dict, or {} when it is missing or unreadable."""
    try:
        saved = json.loads((folder / "settings.json").read_text())
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def given_as_model(folder):
    """One sentence for a train.py run folder passed where a model belongs (sample.py --model runs/latest):
    the file it made, and how to use it; None if `folder` is no run folder."""
    folder = Path(folder)
    if not (folder / "settings.json").is_file():
        return None
    base, words = _saved(folder).get("model"), sorted(set(folder.glob("*.safetensors")) - {
        folder / "model.safetensors", folder / "lora.safetensors"})
    if (folder / "model.safetensors").is_file():
        use = f"its personalized model is {folder / 'model.safetensors'}, so load that"
    elif (folder / "lora.safetensors").is_file():
        use = f"it trained a LoRA, so load its base model{f' ({base})' if base else ''} with --lora " \
              f"{folder / 'lora.safetensors'}"
    elif words:
        use = f"it trained a new word, so load its base model{f' ({base})' if base else ''} with --embedding {words[0]}"
    else:
        use = "it has exported nothing yet; let it finish, or continue it with train.py --resume"
    return f"{folder} is a train.py run folder, not a model: {use}."


def recorded_identifiers(paths):
    """The subject identifiers train.py recorded in the files it exported: a model's "minidb_run" entry, a
    LoRA's or an embedding's "minidb" entry (a --concepts run lists its subjects). In order, each once."""
    found = []
    for path in paths:
        metadata = read_metadata(path)
        for key in ("minidb_run", "minidb"):  # a model's "minidb" entry holds its configs, with no identifier
            try:
                run = json.loads(metadata.get(key, "null"))
            except json.JSONDecodeError:
                continue
            subjects = run.get("subjects") if isinstance(run, dict) and isinstance(run.get("subjects"), list) else [run]
            found += [s["identifier"] for s in subjects if isinstance(s, dict) and isinstance(s.get("identifier"), str)]
    return list(dict.fromkeys(found))


# Flags whose default can change under a run: the model (the toy one until SD 1.5 is fetched) and the
# steps (the toy model's went from 800 to 1,200). A resume that leaves them out keeps the run's own.
# (Not --lr: with --scale-lr the saved rate is already scaled; a changed default rate is refused, named.)
KEPT_ON_RESUME = {"model": str, "steps": int}


def keep_saved_defaults(args):
    """On --resume, give each KEPT_ON_RESUME flag the command left out the value the run began with."""
    saved = _saved(Path(args.out) if args.out is not None else RUNS / "latest") if args.resume else {}
    for key, kind in KEPT_ON_RESUME.items():
        value = saved.get(key)
        if getattr(args, key) is None and type(value) is kind:  # a hand-edited value of another type is not taken
            setattr(args, key, value)


def check_resume_settings(folder, settings):
    """On --resume, every setting that shapes the run must equal the one the run started with."""
    saved = _saved(folder)
    if not saved:
        raise RunError(f"--resume cannot read {folder / 'settings.json'}, so it cannot check that this command "
                       "continues the same run; start over with --overwrite.")
    # Settings that follow from others (the identifier from --seed, the resolution from --model)
    # come last, so that a change is named by the flag the user changed.
    for key in sorted(settings, key=lambda k: k in DERIVED):
        value = settings[key]
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        old = saved[key]
        if key in PATH_FLAGS and old is not None and not isinstance(old, str):
            raise RunError(f"{folder / 'settings.json'} records {flag(key)} as {old!r}, which is not a path, so the "
                           "file was edited or damaged; put back the path the run started with, or start over with "
                           "--overwrite.")
        if key in PATH_FLAGS and value is not None and old is not None:
            same = Path(value).resolve() == Path(old).resolve()
        else:
            same = value == old
        if not same:
            raise RunError(f"{flag(key)} is {value!r} now but the run in {folder} started with {old!r}, and "
                           f"changing it would not continue the same run; resume with {old!r}, or start a new run.")


def trim_log(path, step):
    """On --resume, keep log.jsonl in step with the checkpoint resumed from: its rows up to `step`. A line
    that is no row (a kill tore the last one mid-write) is dropped, and each kept row ends its line, so
    that the rows the run goes on to append are whole."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and type(row.get("step")) is int and row["step"] <= step:
            rows.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(rows)))


# ---- checkpoints ----

def save_state(folder, step, modules, extra, keep=1):
    """Write a checkpoint folder `step-NNNNNN`: weights of the trained `modules` (fp32 safetensors)
    and `extra` (optimizer, scaler, RNG and data-order state: tensors and plain values only, so it
    reloads with weights_only=True). It is written as `.step-NNNNNN.tmp` and renamed into place; an
    older checkpoint is removed only once the new one is complete."""
    folder = Path(folder)
    final, tmp, old = folder / f"step-{step:06d}", folder / f".step-{step:06d}.tmp", folder / f".step-{step:06d}.old"
    latest_state(folder)  # puts back a checkpoint that a crash left half-swapped
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            write_safetensors(tmp / f"{name}.safetensors", {k: v.float() for k, v in module.state_dict().items()})
        write_pickle(tmp / "state.pt", {"step": step, **extra})
        fsync(tmp / "state.pt")
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep the partial copy
        raise
    if final.exists():  # re-saving a step: the old copy steps aside until the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(folder)
    shutil.rmtree(old, ignore_errors=True)
    for stale in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(stale)
    return final


def latest_state(folder):
    """The newest checkpoint folder, or None. A `.step-N.old` whose `step-N` is missing is a
    checkpoint that a crash caught in the middle of a swap: it is complete, so it is put back."""
    folder = Path(folder)
    for old in folder.glob(".step-*.old"):
        final = folder / old.name[1:-4]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    states = sorted(folder.glob("step-*"))
    return states[-1] if states else None


def resume_point(folder, what):
    """The checkpoint --resume WHAT continues from: "latest", a step number, or a checkpoint folder's path.
    Checkpoints after it belong to the branch that is abandoned: they are moved into
    folder/abandoned/, not deleted, and the newest one left in `folder` is the one returned."""
    folder = Path(folder)
    latest = latest_state(folder)
    if what == "latest":
        return latest
    if what.isdigit():
        path = folder / f"step-{int(what):06d}"
        if not path.is_dir():
            have = ", ".join(str(int(p.name[5:])) for p in sorted(folder.glob("step-*"))) or "none"
            raise RunError(f"--resume {what}: the run has no checkpoint of step {int(what)} (it has: {have}); "
                           "pass one of those, or latest.")
    else:
        path = Path(what)
        if not (path / "state.pt").is_file():
            raise RunError(f"--resume {what} is neither latest, a step number, nor a checkpoint folder (one with a "
                           "state.pt); pass one of those.")
        path = path.resolve()
    if path.parent == folder.resolve() or path.parent == folder:
        for later in sorted(folder.glob("step-*")):
            if later.name > path.name:
                (folder / "abandoned").mkdir(exist_ok=True)
                os.replace(later, folder / "abandoned" / later.name)
                print(f"set aside {later.name}, after the resumed step, in {folder / 'abandoned'}")
    return path


class BadCheckpoint(ModelFileError):
    """What load_state found wrong with a checkpoint, as a clause of its sentence."""


def load_state(path, modules, required=("step", "optimizer", "scheduler", "scaler", "generator", "orders")):
    """Restore the trained modules' weights from a checkpoint folder; return its extra state, which
    must hold the `required` entries, each of the type save_state wrote."""
    try:
        for name, module in modules.items():
            tensors, _ = read_tensors(Path(path) / f"{name}.safetensors")
            if first_non_finite(tensors):  # training on from it would only give NaN again
                raise BadCheckpoint(f"its {name}.safetensors holds NaN or infinite weights")
            module.load_state_dict({k: v.to(next(module.parameters()).dtype) for k, v in tensors.items()}, strict=True)
        state = read_tensors(Path(path) / "state.pt")[0]  # weights_only: a planted pickle never runs
        for key in required:
            if key not in state:
                raise BadCheckpoint(f"it has no {key!r} entry")
        for key, value in state.items():
            if not _fits(key, value):
                raise BadCheckpoint(f"its {key!r} entry is damaged")
    except (ModelFileError, RuntimeError) as e:
        reason = ("it holds pickled objects besides tensors, which minidb never loads" if "pickled" in str(e) else
                  str(e) if isinstance(e, BadCheckpoint) else "a file in it is truncated or does not fit the model")
        raise RunError(f"The checkpoint {path} cannot be resumed ({reason}); start the run over with "
                       "--overwrite.") from None
    return state


def _fits(key, value):
    """Whether a state.pt entry is what save_state wrote: a hand-edited or foreign one is refused here, not
    met as a TypeError from deep inside torch; and Adam's moments must be finite, as the weights are."""
    whole = lambda v: type(v) is int and v >= 0
    if key == "step":
        return whole(value)
    if key in ("scheduler", "scaler"):
        return isinstance(value, dict)
    if key == "generator":  # torch.Generator.get_state()
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
    if key == "orders":  # minidb/loop.py's Examples.state()
        return isinstance(value, dict) and all(
            isinstance(s, dict) and isinstance(s.get("order"), torch.Tensor) and s["order"].dtype == torch.long
            and s["order"].dim() == 1 and whole(s.get("taken")) for s in value.values())
    if key == "optimizer":
        groups, moments = (value.get("param_groups"), value.get("state")) if isinstance(value, dict) else (None, None)
        return (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                 for g in groups)
                and isinstance(moments, dict) and all(isinstance(m, dict) for m in moments.values())
                and not first_non_finite({f"{i}.{k}": v for i, m in moments.items() for k, v in m.items()}))
    if key == "drift_base":
        return value is None or isinstance(value, float)
    return True  # an entry only its own caller reads (minidb/toy/base.py's python_rng)
