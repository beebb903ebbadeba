"""--resume: a resumed run is the run it continues, or one sentence says which flag would change it.

train.py records every setting that shapes a run in its settings.json (minidb/runs.py has the folder). A
flag the resumed command leaves out is the run's own (keep_the_runs_own). One it gives must be the same,
except the few that only say how long to train and how often to save and look; settings that follow from
others come last, so that a change is named by the flag the user changed. Under torchrun the global batch
(processes x --batch-size) is what must stay.
"""

import argparse
import os
from pathlib import Path

from minidb.runs import CHECKPOINT, RUNS, RunError, flag, saved_settings
from minidb.tokenizer import as_read

# Flags that may change on --resume: how long to train, and how often to save and look.
RESUMABLE_CHANGES = {"steps", "save_every", "validate_every", "resume", "overwrite", "out", "class_cache",
                     "checkpoints_keep", "validation_prompt", "validation_images",
                     "concepts"}  # the file may move: its "subjects" are compared
PATH_FLAGS = {"images", "model", "class_dir", "concepts"}
PHOTOS = {"photos", "class_photos"}  # data.fingerprint's record of them
DERIVED = {"identifier", "instance_prompt", "class_prompt", "resolution", "mixed_precision", "base_version",
           "prediction_type"}
# The end of each sentence about a settings.json value that train.py never wrote.
EDITED = "so the file was edited or damaged; put back the value the run started with, or start over with --overwrite."

METHOD_FLAGS = {"lora_rank": ("lora",), "lora_alpha": ("lora",), "train_text_encoder": ("full", "lora"),
                "new_token": ("full", "lora"), "save_dtype": ("full",)}  # flags that mean nothing to other methods


# On --resume a flag the command leaves out takes the value the run began with, from its settings.json, so
# that `train.py --resume` alone continues any run, even where a default has changed since. Not taken: the
# command's own flags; the subject's when the command names a subject (another subject is refused, named);
# a --concepts run's identifier and prompts (the first subject's, which the file names); and another
# --method's flags (the changed method is refused, named).
COMMAND_OWN = {"help", "resume", "overwrite", "out"}
SUBJECT = {"images", "class_name", "concepts", "identifier", "instance_prompt", "class_prompt"}


def keep_the_runs_own(p, argv, args):
    """Give each flag `argv` leaves out the run's own value. The values go through the flags' own checks,
    as if typed, so a hand-edited settings.json is refused in one sentence. Returns a problem, or None.
    (A folder without settings.json keeps nothing: the resume then refuses it, and says why.)"""
    where = (Path(args.out) if args.out is not None else RUNS / "latest") / "settings.json"
    saved = saved_settings(where.parent)
    if where.is_file() and not saved and any((where.parent / "checkpoints").glob(CHECKPOINT)):
        return (f"--resume cannot read {where} (it is damaged, or not the settings train.py wrote), so it cannot "
                "continue the run as it began; start over with --overwrite.")
    for action in p._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(p.parse_args(argv)))  # the flags the command names, and only those
    args.given = given  # check_resume_settings: a null the command did not set is the file's, not the command's
    leave = COMMAND_OWN | given
    if given & {"images", "class_name", "concepts"}:
        leave |= SUBJECT
    elif saved.get("concepts") is not None:
        leave |= {"identifier", "instance_prompt", "class_prompt"}
    method = args.method or saved.get("method")
    leave |= {key for key, methods in METHOD_FLAGS.items() if method not in methods}
    concepts = saved.get("concepts")
    if "concepts" not in leave and isinstance(concepts, str) and not Path(concepts).is_file():
        return (f"the run's --concepts {concepts} is no longer there; give --concepts with the file's new place (its "
                "subjects must be the ones the run started with).")
    typed = []  # the run's own values, as the command line would give them
    for action in p._actions:
        value = saved.get(action.dest)
        if action.dest in leave or value is None or value is False or not action.option_strings:
            continue
        name = action.option_strings[0]
        if action.nargs == 0:  # a switch: on, or left out
            fits, texts = value is True, []
        elif isinstance(action, argparse._AppendAction):  # repeatable: a list
            fits, texts = isinstance(value, list) and all(type(v) is str for v in value), value
        else:
            fits, texts = type(value) in (str, int, float), [str(value)]  # str() of a float reads back the same
        if not fits:
            return f"{where} records {name} as {value!r}, which that flag cannot be, {EDITED}"
        typed += [name] if action.nargs == 0 else [f"{name}={text}" for text in texts]

    def refuse(message):
        raise ValueError(message)
    p.error = refuse  # argparse reports a bad value through error(): here it is the file's, not the command's
    try:
        kept = vars(p.parse_args(typed))
    except ValueError as e:
        return f"{where} records a value train.py refuses ({e}), {EDITED}"
    for key, value in kept.items():
        setattr(args, key, value)
    return None


def absolute_paths(settings):
    """The settings with each path that exists made absolute (os.path.abspath: the user's links kept), so that
    a resume from another working folder finds the model, photos and files the run began with. (A Hub id
    stays as it is.)"""
    whole = lambda path: os.path.abspath(path) if isinstance(path, str) and Path(path).exists() else path  # noqa: E731
    out = {**settings, **{key: whole(settings.get(key)) for key in PATH_FLAGS}}
    if isinstance(settings.get("class_cache"), str):  # (made later, when only the drift watch draws: never a Hub id)
        out["class_cache"] = os.path.abspath(settings["class_cache"])
    if settings.get("subjects"):
        out["subjects"] = [{**subject, "images": whole(subject["images"])} for subject in settings["subjects"]]
    return out


def check_resume_settings(folder, settings, given):
    """On --resume, every setting that shapes the run must equal the one the run started with. `given`: the
    flags the command names (the others are the run's own, or defaults)."""
    saved = saved_settings(folder)
    if not saved:
        raise RunError(f"--resume cannot read {folder / 'settings.json'}, so it cannot check that this command "
                       "continues the same run; start over with --overwrite.")
    check_global_batch(folder, saved, settings)
    # Settings that follow from others (the identifier from --seed, the resolution from --model) come last, so that
    # a change is named by the flag the user changed; the photos as training reads them (at --resolution, --flip'ed)
    # come after all.
    for key in sorted(settings, key=lambda k: (k in PHOTOS, k in DERIVED)):
        value = settings[key]
        if key in RESUMABLE_CHANGES or key not in saved or (key in ("batch_size", "processes") and "processes" in saved):
            continue
        old = saved[key]
        if key in PATH_FLAGS and old is not None and not isinstance(old, str):
            raise RunError(f"{folder / 'settings.json'} records {flag(key)} as {old!r}, which is not a path, so the "
                           "file was edited or damaged; put back the path the run started with, or start over with "
                           "--overwrite.")
        if key in PATH_FLAGS and value is not None and old is not None:
            same = Path(value).resolve() == Path(old).resolve()
        elif key == "subjects":  # a run begun before class prompts that read alike ("Ball", "ball") shared a prior
            same = _read_alike(value) == _read_alike(old)
        else:
            same = value == old
        if same:
            continue
        numbers = all(type(v) in (int, float) for v in (old, value))
        if (old is None and (key in DERIVED or key not in given)) or (None not in (old, value) and type(old) is not type(value) and not numbers):
            raise RunError(f"{folder / 'settings.json'} records {flag(key)} as {old!r}, which train.py never writes "
                           f"for it, {EDITED}")
        if key in PHOTOS and old is not None:
            raise RunError(f"the {'class photos (--class-dir)' if key == 'class_photos' else 'photos'} are not the ones "
                           f"the run in {folder} started with ({_change(old, value)}), so it would not continue the same "
                           "run; put them back as they were, or start a new run.")
        if key == "subjects":  # --concepts: name the first subject that differs, not the whole list
            now, was = _read_alike(value), _read_alike(old) or []  # (as compared: a relative folder is the same)
            which = next((i for i, (a, b) in enumerate(zip(now, was), 1) if a != b), min(len(now), len(was)) + 1)
            raise RunError(f"--concepts {settings.get('concepts')} gives other subjects than the run in {folder} "
                           f"started with (subject {which} differs), so it would not continue the same run; put the "
                           "file back as it was, or start a new run.")
        began = f"started without {flag(key)}" if old is None else f"started with {old!r}"
        advice = f"resume without {flag(key)}" if old is None else f"resume with {old!r}"
        raise RunError(f"{flag(key)} is {value!r} now but the run in {folder} {began}, and changing it would not "
                       f"continue the same run; {advice}, or start a new run.")


def _change(old, new):
    """The first photo that differs between two records of data.fingerprint (one per subject for "photos"), in
    words: "3.png is gone", "7.png is new", "2.png changed"."""
    pairs = list(zip(old, new)) if isinstance(old, list) and isinstance(new, list) else [(old, new)]
    for was, now in pairs:
        if not (isinstance(was, dict) and isinstance(now, dict)):
            break
        for name in sorted(was.keys() | now.keys()):
            if was.get(name) != now.get(name):
                return f"{name} {'is gone' if name not in now else 'is new' if name not in was else 'changed'}"
    return "they changed"


def _read_alike(subjects):
    """--concepts subjects as recorded, their class prompts as the model reads them; None if not a list of them."""
    try:
        return [{**subject, "class_prompt": as_read(subject["class_prompt"]),  # a folder, wherever it was named from
                 "images": os.path.abspath(subject["images"])} for subject in subjects]
    except (TypeError, KeyError, AttributeError):
        return None


def check_global_batch(folder, saved, settings):
    """Under torchrun each of N processes trains --batch-size examples of one global batch, drawn alike in every
    process (minidb/loop.py), so a run resumes on any number of processes whose global batch is the same: 2 at
    --batch-size 1 goes on as 1 at --batch-size 2. A run recorded before the number of processes was (no
    "processes") compares --batch-size alone, in check_resume_settings."""
    if "processes" not in saved:
        return
    old, new = (saved.get("processes"), saved.get("batch_size")), (settings["processes"], settings["batch_size"])
    if not all(type(x) is int and x > 0 for x in old):
        raise RunError(f"{folder / 'settings.json'} records {old[0]!r} processes at --batch-size {old[1]!r}, which "
                       f"train.py never writes, {EDITED}")
    if old[0] * old[1] == new[0] * new[1]:
        return
    processes = lambda n: f"{n} process{'es' * (n > 1)}"  # noqa: E731
    each = (f"with --batch-size {old[0] * old[1] // new[0]} on {processes(new[0])}, or "
            if old[0] * old[1] % new[0] == 0 and new[0] != old[0] else "")  # (on as many: the run's own, below)
    first = (f"under torchrun --nproc_per_node {old[0]}" if old[0] > 1 else "as one process") + f" at --batch-size {old[1]}"
    raise RunError(f"the run in {folder} trains a global batch of {old[0] * old[1]} ({processes(old[0])} at --batch-size "
                   f"{old[1]}), but this command's is {new[0] * new[1]} ({processes(new[0])} at --batch-size "
                   f"{new[1]}), which would not continue the same run; resume {each}{first}.")
