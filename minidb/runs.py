"""The run folder of train.py: where a run lives, who may write to it, and how it resumes.

- Without --out, every run gets a fresh numbered folder (runs/dreambooth-1, -2, ...) and the link
  runs/latest points at the newest one once it begins, so the same command works twice in a row;
  a run that stops before it begins (a bad input) leaves no folder behind.
- A lock file: two runs never write into one folder.
- What a folder holds decides what a new run may do with it: nothing (start), a run with a
  checkpoint (--resume, or --overwrite), a run that died before its first checkpoint (--overwrite),
  or files that are not a run (never touched).
- --resume continues the run exactly as it started: a flag that would change the run is refused
  (minidb/resume.py), and a flag left out is the run's own (settings.json) rather than today's
  default (keep_the_runs_own, there too).
- The checkpoints inside it: minidb/state.py writes and reads them; latest_state, here, finds the newest.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from minidb.files import json_loads, read_metadata
from minidb.writes import atomic_write, dangling_link

RUNS = Path("runs")
# A checkpoint is checkpoints/step-000600; other names there (a copy, a backup) are the user's, never ours.
CHECKPOINT = "step-" + "[0-9]" * 6
# Everything a run writes into its folder (hidden names are temporary files and the lock).
RUN_FILES = {"checkpoints", "validation", "log.jsonl", "settings.json", "loss.png", "model", "model.safetensors",
             "lora.safetensors", "README.md"}  # and the new word's embedding, IDENTIFIER.safetensors
FLAG_NAMES = {"class_name": "--class"}


class RunError(Exception):
    """A run folder that cannot be used as asked. The message is one sentence for the user."""


def flag(key):
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


# ---- where a run lives ----

def new_run_folder(root=RUNS, name="dreambooth"):
    """root/name-N, one past the highest N there, made (root/latest points at it once the run has begun:
    began()). Past the highest, not the first gap: a deleted run's number is not given to a newer run, so
    the newest run has the highest number. Two runs starting at once each get their own."""
    taken = [p.name.removeprefix(f"{name}-") for p in root.glob(f"{name}-*")] if root.is_dir() else []
    n = max((int(t) for t in taken if t.isdigit() and t.isascii()), default=0) + 1
    while True:
        folder = root / f"{name}-{n}"
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # another run took it between the look and the mkdir
            n += 1


def run_folder(out, resume):
    """(the folder a run writes to, the outermost folder made for it now or None): `out` (--out) if given,
    runs/latest on --resume, else a new runs/dreambooth-N; made, and checked writable."""
    if out is not None or resume:
        folder = Path(out) if out is not None else (RUNS / "latest").resolve()
        made = _outermost_missing(folder)
    else:
        made = _outermost_missing(RUNS)
        folder = new_run_folder()
        made = made or folder  # runs/ itself, or only the new folder in it
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        link = dangling_link(folder)
        why = f"{link} is a link to {os.readlink(link)}, which does not exist" if link else e.strerror
        raise RunError(f"Cannot write to --out {folder} ({why}); choose another folder.") from None
    return folder, made


def _outermost_missing(folder):
    """The outermost of `folder` and its parents that is not there yet (mkdir(parents=True) makes it), or None."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            return missing
        missing = path
    return missing


def began(folder):
    """Whether the run in `folder` has begun: its settings.json, written before the first step."""
    return (folder / "settings.json").exists()


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
def locked(folder, check=lambda: None, made=None):
    """Hold an exclusive lock on folder/.lock while the run writes there. The operating system lets
    go of it when the process ends, however it ends, so a killed run never leaves a stale lock.
    `check` (check_folder) runs once the lock is held. A folder it refuses is left as it was found,
    and so is one whose run stops before it begins (a bad input found after the lock): its .lock goes,
    and the folders made for it (`made`: the outermost, from run_folder) too, so that a typo leaves
    no empty run folder behind. (Windows has no flock: runs are not guarded there.)"""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock_made = fcntl is not None and not (folder / ".lock").exists()
    try:
        f = open(folder / ".lock", "a+") if fcntl else None
    except OSError as e:  # a folder of that name, or a file the user cannot write
        raise RunError(f"Cannot use {folder / '.lock'} as the run's lock file ({e.strerror}); move it away, or "
                       "choose another --out.") from None
    try:
        if f:
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
        try:
            check()
            yield
        finally:
            if not began(folder):  # refused, or stopped before its first step
                _as_found(folder, lock_made, made)
    finally:
        if f:
            f.close()


def _as_found(folder, lock_made, made):
    """Take back what taking the folder added: its .lock, if made, and the folders from `folder` up to `made`
    (the outermost made for the run), each if still empty."""
    if lock_made:
        (folder / ".lock").unlink(missing_ok=True)
    if made is not None:
        for path in (folder, *folder.parents):
            try:
                path.rmdir()
            except OSError:  # something is in it after all: it stays, and so do the folders above it
                return
            if path == made:
                return


def check_folder(folder, resume, overwrite):
    """Refuse a folder the run may not use as asked. (What --overwrite deletes is deleted later, by
    clear(), once the new run has loaded its model and photos: a bad new input must not cost the old run.)"""
    if resume and overwrite:
        raise RunError("--resume continues a run and --overwrite deletes it; pass one of them.")
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    # A run writes settings.json before its first step; without it, even familiar names are not ours.
    ours = RUN_FILES | {f"{saved_settings(folder).get('identifier')}.safetensors"}
    foreign = [name for name in entries if name not in ours or "settings.json" not in entries]
    if foreign:
        advice = ("move them out of it first" if "settings.json" in entries and (resume or overwrite)  # a run's
                  else "choose a new or empty folder")  # folder: choosing another would leave the run behind
        raise RunError(f"--out {folder} holds files that are not a minidb run ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); {advice}.")
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
    states = sorted(folder.glob(CHECKPOINT))
    return states[-1] if states else None

def clear(folder):
    """Delete the run in `folder` for --overwrite, which check_folder found to be a run (the lock stays)."""
    for path in folder.iterdir():
        if not path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def is_run_folder(folder):
    """Whether `folder` is a train.py run's: its settings.json says which method trained which identifier."""
    return {"method", "identifier"} <= saved_settings(folder).keys()


def saved_settings(folder):
    """The run's settings.json as a dict, or {} when it is missing or unreadable."""
    try:
        saved = json_loads((folder / "settings.json").read_text())
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def given_as_model(path):
    """One sentence for a train.py run folder, or a checkpoint of one or a file in it, passed where a model
    belongs (sample.py --model runs/latest): the file the run made, and how to use it; None if `path` is
    none of these."""
    path = Path(path)
    step = next((p for p in (path, path.parent) if p.match(CHECKPOINT) and p.parent.name == "checkpoints"), None)
    folder = step.parent.parent if step else path.parent if path.name == "checkpoints" else path
    if not (folder / "settings.json").is_file():
        return None
    base, words = saved_settings(folder).get("model"), sorted(set(folder.glob("*.safetensors")) - {
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
    what = (f"{path} is {'' if step == path else 'part of '}the checkpoint of step {int(step.name[5:])} of the train.py "
            f"run in {folder}, which train.py --resume continues" if step else
            f"{path} holds the checkpoints of the train.py run in {folder}" if path != folder else
            f"{folder} is a train.py run folder")
    return f"{what}, not a model: {use}."


def recorded_subjects(paths):
    """The subjects train.py recorded in the files it exported, as dicts with their "identifier" and "new_word":
    true when it is a new word, which the model knows only with its embedding file, the run folder's
    IDENTIFIER.safetensors ("embedding": that file when it lies beside the one read, else None). The record is
    a model's "minidb_run" entry (a diffusers folder keeps it in unet/diffusion_pytorch_model.safetensors), a
    LoRA's or an embedding's "minidb" entry; a --concepts run lists its subjects."""
    found = []
    for path in map(Path, paths):
        run = json_loads(run_record(path) or "null")
        for subject in named_subjects(run):
            word_file = path.parent / f"{subject['identifier']}.safetensors"
            new_word = run.get("new_word") is True
            found.append({**subject, "new_word": new_word,
                          "embedding": word_file if new_word and word_file.is_file() else None})
    return found


def named_subjects(run):
    """A record's subjects that name their identifier: a --concepts run's list, or the record itself."""
    subjects = run.get("subjects") if isinstance(run, dict) and isinstance(run.get("subjects"), list) else [run]
    return [s for s in subjects if isinstance(s, dict) and isinstance(s.get("identifier"), str)]


def run_record(path):
    """The text of train.py's record in the file at `path` (recorded_subjects reads it), or None: a model's
    "minidb_run" entry, a LoRA's or an embedding's "minidb" entry (a model's "minidb" holds its configs)."""
    path = Path(path)
    metadata = read_metadata(path / "unet" / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)
    for key in ("minidb_run", "minidb"):
        try:
            run = json_loads(metadata.get(key, "null"))
        except json.JSONDecodeError:
            continue
        if named_subjects(run):
            return metadata[key]
    return None


def embedding_to_add(subject):
    """For a subject recorded as a new word: its embedding file as --embedding takes it, or, when it does not lie
    beside the file read, where the run wrote it."""
    return subject["embedding"] or f"the run's {subject['identifier']}.safetensors"


def recorded_identifiers(paths):
    """The subject identifiers train.py recorded in the files it exported (recorded_subjects), in order, each once."""
    return list(dict.fromkeys(subject["identifier"] for subject in recorded_subjects(paths)))


def log_rows(path):
    """The rows of a run's log.jsonl, [] where it is missing. A line that is no row (a kill tore the last one
    mid-write, or an editor changed it) is left out, as a plot or a sum over the log can do without it."""
    rows = []
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            row = json_loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and type(row.get("step")) is int:
            rows.append((line, row))
    return rows


def trim_log(path, step):
    """On --resume, keep log.jsonl in step with the checkpoint resumed from: its rows up to `step`, each
    ending its line, so that the rows the run goes on to append are whole."""
    rows = [line + "\n" for line, row in log_rows(path) if row["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(rows)))
