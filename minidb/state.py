"""A run's checkpoints: the training state train.py writes every --save-every steps, and --resume
reading it back.

- A checkpoint is a folder `step-NNNNNN` in the run's checkpoints/: the trained modules' weights
  (fp32 safetensors) and state.pt (optimizer, scheduler, scaler, RNG and data-order state), which
  loads with weights_only=True, so a planted pickle never runs.
- It is written beside the previous one and swapped in by renames, so at every instant one complete
  checkpoint exists; a crash in the middle of a swap is mended on the next look (runs.latest_state,
  which a new run's check of its folder calls too).
- Loading checks what it reads: the weights and Adam's moments must be finite, every entry of the type
  save_state wrote. A checkpoint that fails gets one sentence (RunError), not a traceback.
"""

import os
import shutil
from pathlib import Path

import torch

from minidb.files import ModelFileError, read_tensors
from minidb.writes import first_non_finite, fsync, write_pickle, write_safetensors
from minidb.runs import CHECKPOINT, RunError, latest_state


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
    for stale in sorted(folder.glob(CHECKPOINT))[:-keep]:
        shutil.rmtree(stale)
    return final


NOT_A_RESUME_POINT = ("--resume {} is neither latest, a step number, a run's folder nor a checkpoint folder (one "
                      "with a state.pt); pass one of those.")


def resume_point(folder, what):
    """The checkpoint --resume WHAT continues from: "latest", a step number, or a checkpoint folder's path."""
    folder = Path(folder)
    if what == "latest":
        return latest_state(folder)
    if what.isdigit():
        path = folder / f"step-{int(what):06d}"
        if not path.is_dir():
            have = ", ".join(str(int(p.name[5:])) for p in sorted(folder.glob(CHECKPOINT))) or "none"
            raise RunError(f"--resume {what}: the run has no checkpoint of step {int(what)} (it has: {have}); "
                           "pass one of those, or latest.")
        return path
    if not (Path(what) / "state.pt").is_file():
        raise RunError(NOT_A_RESUME_POINT.format(what))  # (train.py's options refuse it first)
    return Path(what).resolve()


def set_aside_later(folder, path, step):
    """Once the checkpoint `path` has been read back whole: the checkpoints after it belong to the branch
    that is abandoned. They move into folder/abandoned/ (step-000600, or step-000600-2 when a branch
    abandoned before took that name), not deleted, so that the newest one left is `path`. For a `path` of
    elsewhere (one set aside before, or a copy of any name), the folder's checkpoint of its `step` goes too:
    the run would write over it, and its rotation would delete the later ones."""
    folder = Path(folder)
    outside = path.parent not in (folder, folder.resolve())
    for later in sorted(folder.glob(CHECKPOINT)):
        if int(later.name[5:]) > step or (outside and int(later.name[5:]) == step):
            (folder / "abandoned").mkdir(exist_ok=True)
            aside, n = folder / "abandoned" / later.name, 1
            while aside.exists():  # a branch abandoned before at the same step: keep both
                n += 1
                aside = aside.with_name(f"{later.name}-{n}")
            os.replace(later, aside)
            print(f"set aside {later.name}, after the resumed step, as {aside}")


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
