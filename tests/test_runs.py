"""train.py's runs are never lost, locked or poisoned: bad numbers are refused before any work, a NaN
stops the run before it is saved, checkpoints survive a kill at any instant and a full disk, a run
folder always names its way out, --resume continues only the same run, and one folder holds one run.
(The table of bad inputs and their messages is docs/bad-input.md.)"""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError

import train
from minidb import files, options, plot, resume, runs, state, writes
from minidb.load import load
from test_bad_input import Payload, one_sentence
from test_train import ROOT, run, world  # noqa: F401  (world is a fixture)


def refused(capsys, argv, code=2):
    """Run train.py in-process; return its stderr, after checking the exit code and that no
    traceback reached the user."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err
    return err


def base_args(world, out):
    return ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", out,
            "--resolution", 32, "--sample-steps", 2, "--class-cache", world / "cache", "--class-images", 2,
            "--drift-images", 2, "--mixed-precision", "no"]


# ---- numbers and strings that would poison a run ----

@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "argument --lr: must be a finite number, not nan"),
    (["--out", ""], "argument --out: must not be empty; give a path"),  # it meant the current folder
    (["--text-encoder-lr", "1e-5"], "--text-encoder-lr sets the rate of a text encoder that --train-text-encoder "
     "trains, or of a new word (--new-token); add one of them"),
    (["--text-encoder-lr", "1e-5", "--method", "textual-inversion"], "--text-encoder-lr: textual-inversion trains its "
     "new word alone, at --lr"),  # it was told to add --train-text-encoder, which textual-inversion refuses
    (["--prior-weight", "0", "--class-dir", "."], "--class-dir gives the prior-preservation loss its class photos, but "
     "the prior is off (--prior-weight 0); turn it on"),  # both did nothing, silently
    (["--class-dir", ".", "--class-images", "50"], "--class-images 50 sets how many prior images the model draws, "
     "but --class-dir gives them as photos, all of which are used"),  # the count did nothing, silently
    # the docs' placeholder copied in as the identifier trained the letters [V] silently (common tokens)
    (["--identifier", "[V]"], "--identifier [V] holds [V], the placeholder that prompts and captions read as the "
     "identifier; give a rare word such as sks, or leave it out to have one picked."),
    (["--class-dir", "PHOTOS"], "is the folder of a subject's own photos, so the prior-preservation loss would teach "
     "the class prompt that subject"),  # it trained the prior on the subject
    (["--model", " "], "argument --model: must not be empty; give a path"),  # it meant the default model
    (["--lr", "inf"], "argument --lr: must be a finite number, not inf"),
    (["--lr", "0"], "argument --lr: must be above 0"),
    (["--offset-noise", "nan"], "argument --offset-noise: must be a finite number"),
    (["--snr-gamma", "nan"], "argument --snr-gamma: must be a finite number"),
    (["--snr-gamma", "-5"], "argument --snr-gamma: must be above 0"),
    (["--prior-weight", "nan"], "argument --prior-weight: must be a finite number"),
    (["--prior-weight", "-1"], "argument --prior-weight: must be between 0 and 1000, not -1"),
    (["--warmup-steps", "-10"], "argument --warmup-steps: must be at least 0"),
    (["--text-encoder-lr", "-1"], "argument --text-encoder-lr: must be above 0"),
    (["--steps", "0"], "argument --steps: must be between 1 and 1000000, not 0"),
    (["--steps", "1.5"], "argument --steps: '1.5' is not a whole number"),
    (["--sample-steps", "0"], "argument --sample-steps: must be between 1 and 999"),
    (["--class-images", "-1"], "argument --class-images: must be between 0 and 100000, not -1"),
    (["--class-images", "1000000000000000"], "argument --class-images: must be between 0 and 100000"),
    (["--steps", "1000001"], "argument --steps: must be between 1 and 1000000, not 1000001"),
    (["--batch-size", "1000000"], "argument --batch-size: must be between 1 and 1024"),
    (["--prior-weight", "1e308"], "argument --prior-weight: must be between 0 and 1000"),
    (["--lora-alpha", "1e308"], "argument --lora-alpha: must be above 0 and at most 10000"),
    (["--method", "textual-inversion", "--identifier", "two words"],
     "--identifier 'two words' must be one lower-case word to become a new word"),
    (["--method", "textual-inversion", "--identifier", "cup/one"],
     "--identifier 'cup/one' also names the new word's file, cup/one.safetensors, so it cannot hold a slash"),
    (["--new-token", "--identifier", ".sks"], "--identifier '.sks' also names the new word's file"),
    # a word past 200 bytes made a file name past the 255 a file system holds: the export failed after training
    (["--new-token", "--identifier", "q" * 201], "--identifier qqqqqqqqqqqqqqqqqqqq... is 201 bytes long"),
    (["--images", ""], "argument --images: must not be empty; give a path"),  # it meant the current folder
    (["--resume", " "], "argument --resume: must not be empty; give latest, a step number, a run's folder or a "
     "checkpoint"),
    (["--class-dir", ""], "argument --class-dir: must not be empty; give a path"),  # it was ignored, silently
    (["--class-cache", " "], "argument --class-cache: must not be empty; give a path"),
    (["--out", "o" * 256], "argument --out: has a name of 256 bytes (oooooooooooooooooooo...), longer than the 255"),
    (["--images", "runs/" + "é" * 128], "argument --images: has a name of 256 bytes"),  # bytes, not characters
    (["--seed", str(2**64)], "argument --seed: must be between 0 and"),
    (["--resolution", "30"], "--resolution must be a multiple of 8"),
    (["--resolution", "100000"], "argument --resolution: must be between 8 and 2048"),
    (["--class-images", "0"], "--class-images 0 leaves the prior-preservation loss without images"),
    (["--class", ""], "argument --class: must not be empty"),
    (["--identifier", ""], "argument --identifier: must not be empty"),
    (["--instance-prompt", "  "], "argument --instance-prompt: must not be empty"),
    (["--class-prompt", "a photo of a \udcff"], "argument --class-prompt: is not valid UTF-8 text"),
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
])
def test_bad_values_are_refused_before_any_work(world, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    err = refused(capsys, base_args(world, out) + [world / "photos" if a == "PHOTOS" else a for a in args])
    assert message in err and err.count("error:") == 1
    assert not out.exists()  # nothing was started


def test_an_out_through_a_link_to_nothing_names_the_link(world, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "runs")
    for out in (tmp_path / "link", tmp_path / "link" / "dog"):
        err = refused(capsys, base_args(world, out))
        assert f"Cannot write to --out {out} ({tmp_path / 'link'} is a link to {tmp_path / 'gone' / 'runs'}, which " \
               "does not exist); choose another folder." in err
    assert not (tmp_path / "gone").exists()


def test_a_class_cache_inside_the_run_folder_is_refused_before_it_is_made(world, tmp_path, capsys):
    """It was made first, and the new run folder was then refused as holding files that are not a run."""
    err = refused(capsys, base_args(world, tmp_path / "out") + ["--class-cache", tmp_path / "out" / "cache"])
    assert f"--class-cache {tmp_path / 'out' / 'cache'} is inside --out {tmp_path / 'out'}, the run's own folder" in err
    assert not (tmp_path / "out").exists()


def test_the_default_class_cache_follows_xdg_cache_home(monkeypatch):
    """The default --class-cache is $XDG_CACHE_HOME/minidb/class-prior, else ~/.cache/minidb/class-prior (the tests'
    own conftest points it at a folder of the test run, so that they do not fill the user's cache)."""
    from minidb.options import parse_args
    argv = ["--images", "x", "--class", "dog"]
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert parse_args(argv, train.__doc__).class_cache == str(Path("/somewhere/cache/minidb/class-prior"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert parse_args(argv, train.__doc__).class_cache == str(Path.home() / ".cache" / "minidb" / "class-prior")


def test_an_unwritable_class_cache(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(capsys, base_args(world, tmp_path / "out") + ["--class-cache", tmp_path / "file" / "cache"])
    assert "Cannot write the class-prior cache to --class-cache" in err and not (tmp_path / "out").exists()


def test_far_more_memory_than_the_machine_has_is_refused_before_work(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.memory, "available_ram", lambda: 10**6)  # a machine with 1 MB free
    err = refused(capsys, base_args(world, tmp_path / "out"))
    assert "training at 32 px needs about" in err and "1 MB" not in err and "0.0 GB available" in err
    assert not (tmp_path / "out" / "settings.json").exists()


def test_out_naming_a_file(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = refused(capsys, base_args(world, tmp_path / "file"))
    assert f"--out {tmp_path / 'file'} is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "x"


def test_out_named_like_a_model_file_is_refused(world, tmp_path, capsys):
    """--out dog.safetensors would have made a run folder of that name: --out is the run's folder."""
    err = refused(capsys, base_args(world, tmp_path / "dog.safetensors"))
    assert (f"--out {tmp_path / 'dog.safetensors'} looks like a model file's name, but --out is the run's folder "
            f"(the model is written into it, as model.safetensors and more); pass a folder, such as --out "
            f"{tmp_path / 'dog'}.") in err
    assert list(tmp_path.iterdir()) == []


def poison(monkeypatch, at_call, how):
    """Make train.py's loss (how="loss") or its gradient (how="gradient") NaN from the at_call-th step on."""
    calls, real = [], train.dreambooth_loss

    def loss(pred, *args, **kwargs):
        calls.append(1)
        if len(calls) >= at_call and how == "gradient":
            pred.register_hook(lambda g: torch.full_like(g, float("nan")))
        out = real(pred, *args, **kwargs)
        if len(calls) >= at_call and how == "loss":
            return (out[0] * float("nan"),) + out[1:]
        return out

    monkeypatch.setattr(train, "dreambooth_loss", loss)


def test_a_nan_loss_stops_the_run_keeps_the_last_checkpoint_and_exports_nothing(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    poison(monkeypatch, 3, "loss")
    err = refused(capsys, base_args(world, out) + ["--steps", 4, "--save-every", 2], code=1)
    assert "The loss became NaN or infinite at step 3" in err
    assert ("that usually means a learning rate too high (--lr 5e-06), too large a --prior-weight or a base model "
            "with broken weights") in err  # the likely causes, none of them claimed
    assert f"the last good checkpoint {out / 'checkpoints' / 'step-000002'} is kept" in err
    assert not (out / "model.safetensors").exists() and not (out / "model").exists()
    kept, _ = files.read_tensors(out / "checkpoints" / "step-000002" / "unet.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_nan_weights_are_never_checkpointed(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    poison(monkeypatch, 2, "gradient")  # the loss of step 2 is finite; the update it makes is not
    err = refused(capsys, base_args(world, out) + ["--steps", 4, "--save-every", 2], code=1)
    assert "The trained weights became NaN or infinite at step 2" in err and "no checkpoint was written" in err
    assert runs.latest_state(out / "checkpoints") is None and not (out / "model.safetensors").exists()


def test_a_failure_before_the_first_step_gives_back_the_signal_handlers(world, tmp_path, monkeypatch):
    """train.py takes Ctrl-C and SIGTERM just before it measures the base model's drift, which can run out of
    GPU memory: the handlers are given back then too (conftest fails a test that leaves them changed)."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a stand-in)")
    monkeypatch.setattr(train, "drift_score", out_of_memory)
    with pytest.raises(RuntimeError, match="a stand-in"):
        train.main([str(a) for a in base_args(world, tmp_path / "out") + ["--steps", 1]])


# ---- checkpoints survive a kill at any instant, and a full disk ----

class Killed(BaseException):
    pass


def test_a_kill_at_any_instant_of_a_resave_leaves_one_complete_checkpoint(tmp_path, monkeypatch):
    """save_state re-saving the step it already has (as a resumed run's final save does): kill it at
    each file-system call in turn, and the folder must still hold a complete, loadable checkpoint."""
    module = torch.nn.Linear(3, 2)
    folder = tmp_path / "checkpoints"
    calls = {"n": 0, "kill_at": None}
    real = {"replace": os.replace, "rmtree": state.shutil.rmtree, "write": state.write_safetensors, "save": state.write_pickle}

    def counted(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["kill_at"]:
                raise Killed
            return real[name](*args, **kwargs)
        return call

    for name, target in (("replace", state.os), ("rmtree", state.shutil), ("write", state), ("save", state)):
        monkeypatch.setattr(target, {"replace": "replace", "rmtree": "rmtree", "write": "write_safetensors",
                                     "save": "write_pickle"}[name], counted(name))
    state.save_state(folder, 5, {"unet": module}, {"step_marker": torch.tensor(5)})
    calls["n"] = 0  # count a re-save's calls: it has one more than the first save (the old copy steps aside)
    state.save_state(folder, 5, {"unet": module}, {"step_marker": torch.tensor(5)})
    n_calls = calls["n"]
    for kill_at in range(1, n_calls + 1):
        calls.update(n=0, kill_at=kill_at)
        with torch.no_grad():
            module.weight.add_(1.0)
        try:
            state.save_state(folder, 5, {"unet": module}, {"step_marker": torch.tensor(5)})
        except Killed:
            pass
        calls.update(n=0, kill_at=None)
        kept = runs.latest_state(folder)
        assert kept is not None and kept.name == "step-000005", f"killed at call {kill_at}: no checkpoint"
        weights, _ = files.read_tensors(kept / "unet.safetensors")
        assert set(weights) == {"weight", "bias"} and (kept / "state.pt").is_file(), kill_at


def test_writes_are_fsynced_file_then_folder(tmp_path, monkeypatch):
    synced, real = [], os.fsync
    monkeypatch.setattr(writes.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    writes.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("hello"))
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".a.txt.")) and synced[1] == str(tmp_path)


def fill_disk_on(monkeypatch, name):
    """The next write of a file called `name` finds the disk full. A safetensors file writes half of
    itself, then fails as safetensors' save_file fails on a full disk (its own error, checked on a
    2 MB tmpfs: "Error while serializing: I/O error: No space left on device (os error 28)"). The
    checkpoint's state.pt is written by torch.save into /dev/full, where every write fails with ENOSPC."""
    real_save, real_open = writes.save_file, open

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{name}."):
            Path(filename).write_bytes(b"half a file")
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})")
        return real_save(tensors, filename, metadata=metadata)

    def full_open(file, mode="r", *args, **kwargs):
        return real_open("/dev/full" if Path(file).name == name and "w" in mode else file, mode, *args, **kwargs)

    monkeypatch.setattr(writes, "save_file", save_file)
    monkeypatch.setattr(writes, "open", full_open, raising=False)


@pytest.mark.parametrize("full_on", ["unet.safetensors", pytest.param("state.pt", marks=pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)), reason="needs /dev/full"))])
def test_a_full_disk_keeps_the_last_checkpoint_leaves_no_debris_and_resumes(world, tmp_path, capsys, monkeypatch, full_on):
    out = tmp_path / "out"
    run(world, out, "--save-every", 2, steps=2)  # a finished 2-step run, then train it on to 4
    before = (out / "checkpoints" / "step-000002" / "unet.safetensors").read_bytes()
    fill_disk_on(monkeypatch, full_on)
    err = refused(capsys, base_args(world, out) + ["--steps", 4, "--resume", "--save-dtype", "fp32"])
    assert f"The disk holding {out} is full" in err and "MB are free" in err and "--resume" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no half-written temp folder
    assert (out / "checkpoints" / "step-000002" / "unet.safetensors").read_bytes() == before
    monkeypatch.undo()  # space was freed
    train.main([str(a) for a in base_args(world, out) + ["--steps", 4, "--resume", "--save-dtype", "fp32"]])
    assert runs.latest_state(out / "checkpoints").name == "step-000004" and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("needed,free,says", [(25_000, 4_000, "needs about 25 kB and 4 kB are free"),
                                               (134_000_000, 63_000_000, "needs about 134 MB and 63 MB are free")])
def test_a_full_disk_names_sizes_a_person_can_read(tmp_path, monkeypatch, needed, free, says):
    # a PNG of a few kB was "about 0 MB" next to "0 MB free"
    monkeypatch.setattr(writes.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(writes.DiskFull, match=says):
        with writes.disk_full_is_an_error(tmp_path, needed, "the next image", "draw again"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_without_room_for_the_run_is_refused_before_training(world, tmp_path, capsys, monkeypatch):
    # The tiny model's checkpoint and export take about a megabyte; the disk has 1 kB free.
    monkeypatch.setattr(writes.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    out = tmp_path / "out"
    err = refused(capsys, base_args(world, out) + ["--steps", 4, "--save-dtype", "fp32"])
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: The disk holding {out} has 1 kB free, but the run (its checkpoint and model) "
                           "needs about ") and line.endswith("; free some space, or choose another --out.")
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()


def test_a_full_disk_during_the_export_leaves_no_temp_folder(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    fill_disk_on(monkeypatch, "diffusion_pytorch_model.safetensors")
    err = refused(capsys, base_args(world, out) + ["--steps", 1])
    assert "is full" in err
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == \
        ["checkpoints", "log.jsonl", "loss.png", "settings.json", "validation"]


def test_a_full_disk_while_drawing_the_class_prior(world, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    fill_disk_on(monkeypatch, "00001.safetensors")
    err = refused(capsys, base_args(world, tmp_path / "out") + ["--class-cache", cache])
    assert f"The disk holding {cache} is full: the class-prior cache needs about" in err and "run again" in err
    (folder,) = cache.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["00000.safetensors", "settings.json"]  # no debris


# ---- a run folder always names its way out ----

def test_resume_of_a_folder_that_does_not_exist_creates_nothing(world, tmp_path, capsys):
    out = tmp_path / "typo"
    assert f"--resume found no run in {out}, which does not exist" in refused(capsys, base_args(world, out) + ["--resume"])
    assert not out.exists()


def test_resume_names_the_run_it_cannot_find_and_takes_a_run_folder(world, tmp_path, capsys, monkeypatch):
    """`--resume` alone with no runs/latest (a fresh clone) was told to give the subject, as if starting a run.
    `--resume RUN`, a run's folder, was refused only after another run's folder was taken and the model
    loaded, and never said how; it now continues RUN, as `--out RUN --resume` does."""
    monkeypatch.chdir(tmp_path)
    for argv in (["--resume"], ["--resume", "5"]):
        err = refused(capsys, argv)
        assert "--resume without --out continues runs/latest, which does not exist here; pass the run's folder, " \
               "as --resume RUN or --out RUN --resume." in err
    out = run(world, tmp_path / "run", steps=1)
    train.main([str(a) for a in ["--resume", out, "--steps", 2]])  # the run's own flags, from its settings
    assert state.latest_state(out / "checkpoints").name == "step-000002" and not (tmp_path / "runs").exists()
    with monkeypatch.context() as m:  # run from inside a run's folder, a new run stays new: "." is no --resume
        m.chdir(out)
        args = options.parse_args([str(a) for a in base_args(world, tmp_path / "new")], train.__doc__)
        assert args.resume is None and args.out == str(tmp_path / "new")
    err = refused(capsys, ["--resume", out, "--out", tmp_path / "other", "--steps", 3])
    assert f"error: --resume {out} is a run's folder, but --out names {tmp_path / 'other'}; to continue that run " \
           f"pass --resume {out} alone (or --out {out} --resume), or leave --resume out to start a new run in " \
           f"{tmp_path / 'other'}.\n" in err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(out)
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(runs, "locked", lambda *a, **k: pytest.fail("the run's folder was taken"))
    for argv in (["--resume", tmp_path / "nothing"], ["--out", out, "--resume", tmp_path / "nothing"]):
        assert f"--resume {tmp_path / 'nothing'} is neither latest, a step number, a run's folder nor a checkpoint " \
               "folder (one with a state.pt); pass one of those." in refused(capsys, argv)


def test_a_folder_without_checkpoint_offers_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text("{}")  # a run killed before its first checkpoint
    (out / "log.jsonl").write_text("")
    assert "stopped before its first checkpoint; pass --overwrite" in refused(capsys, base_args(world, out))
    assert "--resume found no checkpoint" in refused(capsys, base_args(world, out) + ["--resume"])
    assert "pass one of them" in refused(capsys, base_args(world, out) + ["--resume", "--overwrite"])
    train.main([str(a) for a in base_args(world, out) + ["--steps", 1, "--overwrite"]])
    assert runs.latest_state(out / "checkpoints").name == "step-000001"
    assert "holds a run with a checkpoint at step 1; pass --resume" in refused(capsys, base_args(world, out))


def test_a_picture_in_a_run_folder_is_named_and_sample_py_does_not_draw_into_one(world, tmp_path, capsys):
    """sample.py --out RUN drew into the run (exit 0); after that --resume said to choose a new or empty
    folder, which abandons the run."""
    out = tmp_path / "run"
    train.main([str(a) for a in base_args(world, out) + ["--steps", 1]])
    # RUN/samples/ stopped --resume too, and the next export replaced RUN/model/ with whatever was drawn into it
    for given, inside in ((out, ""), (out / "samples", "inside "), (out / "model", "inside ")):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(out / "model"), "--prompt", "x",
                            "--out", str(given)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip() == (
            f"error: --out {given} is {inside}a train.py run's folder, which holds only what the run writes; draw into "
            f"another folder, such as --out {tmp_path / 'run-samples'}."), r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        n for n in runs.RUN_FILES if n != "lora.safetensors")  # nothing drawn there
    (out / "00000-1.png").write_bytes(b"a picture put there by hand")
    for flags in (["--resume", "--steps", 2], ["--overwrite"]):
        assert refused(capsys, base_args(world, out) + flags).endswith(
            "holds files that are not a minidb run (00000-1.png); move them out of it first.\n")


def test_resume_with_fewer_steps_than_the_run_took_is_refused_and_changes_nothing(world, tmp_path, capsys):
    """It said the run had already reached step 2, then exited 0 after exporting again and writing settings.json and
    README.md with "steps": 1 for a model of step 2."""
    out = tmp_path / "run"
    train.main([str(a) for a in base_args(world, out) + ["--steps", 2]])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    err = refused(capsys, base_args(world, out) + ["--resume", "--steps", 1])
    assert err.strip().splitlines()[-1] == (f"error: --steps 1 is fewer than the 2 steps the run in {out} has already taken; pass --steps 2 "
                           "or more, or resume an earlier checkpoint (--resume STEP).")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_photos_that_changed_since_the_run_began(world, tmp_path, capsys):
    """It went on with 3 photos of 5, exit 0: another run than the one it continued."""
    photos, out = tmp_path / "photos", tmp_path / "run"
    shutil.copytree(world / "photos", photos)
    assert len(list(photos.iterdir())) > 1
    args = [*base_args(world, out), "--images", photos, "--steps", 1]
    train.main([str(a) for a in args])
    gone = sorted(photos.iterdir())[-1]
    kept = gone.read_bytes()
    gone.unlink()
    resume = [*args[:-1], 2, "--resume"]
    assert refused(capsys, resume).strip().splitlines()[-1] == (
        f"error: the photos are not the ones the run in {out} started with ({gone.name} is gone), so it would not "
        "continue the same run; put them back as they were, or start a new run.")
    gone.write_bytes(kept)
    (photos / f"{gone.stem}.txt").write_text("a photo of [V] ball in the snow")  # a caption is what it trains on too
    assert f"started with ({gone.name} changed)" in refused(capsys, resume)
    (photos / f"{gone.stem}.txt").unlink()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "saved again by an editor")  # other bytes, the same pixels: the same photo
    Image.open(gone).save(gone, pnginfo=info)
    assert gone.read_bytes() != kept
    train.main([str(a) for a in resume])  # put back as they were: it goes on
    assert runs.latest_state(out / "checkpoints").name == "step-000002"


def test_overwrite_never_deletes_files_that_are_not_a_run(world, tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"precious")
    assert "holds files that are not a minidb run (thesis.pdf)" in refused(capsys, base_args(world, out) + ["--overwrite"])
    assert (out / "thesis.pdf").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.pdf"]  # not even the run's .lock is left there


def test_overwrite_keeps_the_old_run_until_the_new_one_has_set_up(world, tmp_path, capsys):
    """A bad photo folder or a damaged model given with --overwrite must not cost the run already there."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)  # an old run, as check_folder sees one
    for name in ("settings.json", "log.jsonl", "model.safetensors", "checkpoints/step-000002/state.pt"):
        (out / name).write_text("old")
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut.safetensors").write_bytes((world / "base" / "unet" / "diffusion_pytorch_model.safetensors")
                                               .read_bytes()[:1000])
    shutil.copytree(world / "base", tmp_path / "nan")  # a model that loads, and would diverge at step 1
    weights = tmp_path / "nan" / "unet" / "diffusion_pytorch_model.safetensors"
    writes.write_safetensors(weights, {k: v * float("nan") for k, v in files.read_tensors(weights)[0].items()})
    for bad in (["--images", tmp_path / "empty"], ["--model", tmp_path / "cut.safetensors"], ["--model", tmp_path / "nan"]):
        err = refused(capsys, base_args(world, out) + bad + ["--overwrite"])
        assert (out / "model.safetensors").read_text() == "old"
        assert (out / "checkpoints" / "step-000002" / "state.pt").read_text() == "old"
    assert f"The model {tmp_path / 'nan'} holds NaN or infinite weights (first in unet." in err
    train.main([str(a) for a in base_args(world, out) + ["--steps", 1, "--overwrite"]])  # good inputs: replaced
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]


def test_a_second_run_on_the_same_folder_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with runs.locked(out):  # another train.py holds the folder
        err = refused(capsys, base_args(world, out))
    assert f"Another train.py (process {os.getpid()}) is running in {out}" in err
    assert not (out / "log.jsonl").exists()


def test_a_lock_that_is_a_folder_is_one_sentence(world, tmp_path, capsys):
    """It was an IsADirectoryError traceback."""
    out = tmp_path / "out"
    (out / ".lock").mkdir(parents=True)
    err = refused(capsys, base_args(world, out))
    assert err.strip() == (f"error: Cannot use {out / '.lock'} as the run's lock file (Is a directory); move it away, "
                           "or choose another --out.")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("flag,value", [("--seed", 1), ("--lr", 1e-4), ("--class", "cup"), ("--resolution", 48),
                                        ("--images", "copy"), ("--model", "copy")])
def test_resume_refuses_a_change_that_would_not_continue_the_run(world, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    run(world, out, steps=1)
    args = base_args(world, out)
    if value == "copy":  # the same photos or model in another place may have changed since: another run
        value = tmp_path / "copy"
        shutil.copytree(args[args.index(flag) + 1], value)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    err = refused(capsys, args + ["--resume", "--steps", 2, "--save-dtype", "fp32"])
    assert f"{flag} is " in err and "started with" in err
    assert runs.latest_state(out / "checkpoints").name == "step-000001"


def test_resume_allows_more_steps_and_other_save_intervals_and_equal_paths(world, tmp_path):
    out = tmp_path / "out"
    run(world, out, steps=1)
    args = base_args(world, out)
    args[args.index("--images") + 1] = Path(os.path.relpath(world / "photos"))  # the same folder, written differently
    train.main([str(a) for a in args + ["--resume", "--steps", 2, "--save-every", 5, "--save-dtype", "fp32"]])
    assert runs.latest_state(out / "checkpoints").name == "step-000002"


def test_resume_without_steps_model_or_subject_continues_the_run_as_it_began(world, tmp_path):
    # A run of 3 steps, resumed from step 1 by a command that names neither --steps nor --model, nor the
    # subject (--images, --class), nor how often it saves and how many it keeps: it must finish the run's own
    # 3 steps on its own base model and photos, not today's defaults (800 or 1,200 steps, the toy or SD 1.5
    # model), and so equal the run made in one go, saving each step and keeping 3 checkpoints, as it began.
    straight = run(world, tmp_path / "straight", "--save-every", 1, "--checkpoints-keep", 3, steps=3)
    branch = tmp_path / "branch"
    shutil.copytree(straight, branch)
    args = base_args(world, branch)
    for flag in ("--model", "--images", "--class"):
        del args[args.index(flag):args.index(flag) + 2]
    (branch / "model.safetensors").unlink()  # the model compared below must be the resumed run's own
    train.main([str(a) for a in args + ["--save-dtype", "fp32", "--resume", 1]])
    # it set aside the copied steps 2 and 3, then trained and saved them again
    assert sorted(p.name for p in (branch / "checkpoints" / "abandoned").glob("step-*")) == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (branch / "checkpoints").glob("step-*")) == [f"step-00000{i}" for i in (1, 2, 3)]
    a, b = load(straight / "model.safetensors"), load(branch / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))


def test_resume_alone_continues_a_run_of_its_own_settings(world, tmp_path):
    """`train.py --out RUN --resume` with no other flag continues a run that began with many: each flag left
    out is the run's own, so the run ends with the weights, and records the settings, of the run made in one go."""
    own = ["--seed", 3, "--lr", 2e-4, "--lr-schedule", "cosine", "--warmup-steps", 1, "--flip", "--offset-noise",
           0.05, "--prior-weight", 0.5, "--identifier", "sks", "--validation-prompt", "a [V] ball on the moon",
           "--save-every", 1, "--checkpoints-keep", 3]
    straight = run(world, tmp_path / "straight", *own, steps=3)
    branch = tmp_path / "branch"
    shutil.copytree(straight, branch)
    (branch / "model.safetensors").unlink()  # the model compared below must be the resumed run's own
    train.main(["--out", str(branch), "--resume", "1"])
    # it set aside the copied steps 2 and 3 and trained them again
    assert sorted(p.name for p in (branch / "checkpoints" / "abandoned").glob("step-*")) == ["step-000002", "step-000003"]
    a, b = load(straight / "model.safetensors"), load(branch / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    settings = [json.loads((folder / "settings.json").read_text()) for folder in (straight, branch)]
    for each in settings:
        del each["out"], each["resume"]
    assert settings[0] == settings[1] and settings[0]["flip"] is True and settings[0]["lr_schedule"] == "cosine"


def test_a_run_begun_with_the_placeholder_as_identifier_still_resumes(world, tmp_path):
    """--identifier [V] is refused for a new run, but a run begun so before that refusal is continued, as a
    resume continues every other run: the refusal would strand its checkpoints."""
    out = run(world, tmp_path / "out", "--identifier", "sks", steps=1)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["instance_prompt"] == "a photo of a sks ball"
    as_recorded = {"identifier": "[v]", "instance_prompt": "a photo of a [v] ball"}  # as such a run recorded them
    (out / "settings.json").write_text(json.dumps({**settings, **as_recorded}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prompt names its identifier: nothing to warn of
        train.main(["--out", str(out), "--resume", "--steps", "2"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
    assert json.loads((out / "settings.json").read_text())["identifier"] == "[v]"


def test_resume_alone_keeps_the_methods_flags_and_a_changed_method_is_named(world, tmp_path, capsys):
    out = run(world, tmp_path / "lora", "--method", "lora", "--lora-rank", 2, "--lora-alpha", 3, "--train-text-encoder",
              steps=1)
    train.main(["--out", str(out), "--resume", "--steps", "2"])
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["steps"], settings["lora_rank"], settings["lora_alpha"], settings["train_text_encoder"]) == (2, 2, 3.0, True)
    # --method full leaves lora's own flags out, so the refusal names the method, not --lora-rank
    err = refused(capsys, ["--out", out, "--resume", "--steps", 3, "--method", "full"])
    assert "--method is 'full' now but the run" in err and "started with 'lora'" in err


@pytest.mark.parametrize("edit,says", [({"lr": "fast"}, "records a value train.py refuses (argument --lr: "),
                                       ({"seed": 2.5}, "records a value train.py refuses (argument --seed: "),
                                       ({"flip": "yes"}, "records --flip as 'yes', which that flag cannot be"),
                                       ({"validation_prompt": "a ball"}, "records --validation-prompt as 'a ball'"),
                                       ({"images": {"a": 1}}, "records --images as {'a': 1}"),
                                       ({"seed": "0"}, "records --seed as '0', which train.py never writes for it"),
                                       ({"identifier": None}, "records --identifier as None, which train.py never"),
                                       # a null for a flag the command leaves out: the file's, not "resume without --lr"
                                       ({"lr": None}, "records --lr as None, which train.py never writes for it"),
                                       ({"seed": None}, "records --seed as None, which train.py never writes for it"),
                                       ("truncated", "(it is damaged, or not the settings train.py wrote)"),
                                       ([1, 2], "(it is damaged, or not the settings train.py wrote)")])
def test_resume_alone_refuses_a_damaged_settings_file_in_one_sentence(world, tmp_path, capsys, edit, says):
    out = run(world, tmp_path / "out", steps=1)
    text = (out / "settings.json").read_text()
    settings = json.loads(text)
    (out / "settings.json").write_text(text[:len(text) // 2] if edit == "truncated" else
                                       json.dumps(edit if isinstance(edit, list) else {**settings, **edit}))
    err = refused(capsys, ["--out", out, "--resume", "--steps", 2])
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"{out / 'settings.json'} {says}" in line and line.endswith("start over with --overwrite.")
    assert runs.latest_state(out / "checkpoints").name == "step-000001"


def test_a_flag_the_run_began_without_is_refused_as_the_commands(world, tmp_path, capsys):
    out = run(world, tmp_path / "out", steps=1)
    err = refused(capsys, ["--out", out, "--resume", "--steps", 2, "--snr-gamma", 5])
    assert "--snr-gamma is 5.0 now but the run" in err and "started without --snr-gamma, and" in err \
        and "resume without --snr-gamma" in err and "None" not in err


def test_a_refused_resume_from_an_earlier_step_sets_nothing_aside(world, tmp_path, capsys):
    """--resume 1 of a damaged step-1 checkpoint is refused before the intact step 2 moves into abandoned/
    (it moved first, and --resume latest then found only the damaged one)."""
    out = run(world, tmp_path / "out", "--save-every", 1, "--checkpoints-keep", 2, steps=2)
    state_file = out / "checkpoints" / "step-000001" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:500])
    assert "cannot be resumed" in refused(capsys, ["--out", out, "--resume", 1, "--steps", 3])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_overwrite_refuses_a_model_that_lies_in_the_run_it_would_delete(world, tmp_path, capsys):
    """Training on from a run's own model with --overwrite of that run would delete the model first (and a
    failed run then leaves the user with neither)."""
    out = run(world, tmp_path / "out", steps=1)
    args = base_args(world, out)
    args[args.index("--model") + 1] = out / "model.safetensors"
    err = refused(capsys, args + ["--steps", 1, "--overwrite"])
    assert f"--model {out / 'model.safetensors'} lies inside --out {out}, which --overwrite deletes" in err
    assert (out / "model.safetensors").is_file() and runs.latest_state(out / "checkpoints") is not None


def test_resume_from_another_runs_checkpoint_is_refused(world, tmp_path, capsys):
    """--resume PATH of a checkpoint from a run with another seed would go on with that run's weights, data
    order and random state: refused, naming the setting and that run."""
    mine, other = run(world, tmp_path / "mine", steps=1), run(world, tmp_path / "other", "--seed", 5, steps=1)
    err = refused(capsys, base_args(world, mine) + ["--save-dtype", "fp32", "--steps", 2, "--resume",
                                                    other / "checkpoints" / "step-000001"])
    assert f"--seed is 0 now but the run in {other} started with 5" in err
    assert runs.latest_state(mine / "checkpoints").name == "step-000001"


def test_a_copy_of_a_checkpoint_is_the_users_not_a_checkpoint(world, tmp_path, capsys):
    """A copy beside the checkpoints (a file manager's "step-000001 copy") is neither resumed from, nor
    counted, nor deleted by the rotation (int("000001 copy") stopped the run with a traceback)."""
    out = run(world, tmp_path / "out", steps=1)
    copy = out / "checkpoints" / "step-000001 copy"
    shutil.copytree(out / "checkpoints" / "step-000001", copy)
    assert "(it has: 1)" in refused(capsys, ["--out", out, "--resume", 3])
    train.main(["--out", str(out), "--resume", "--steps", "2"])  # keeps 1 checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001 copy", "step-000002"]


@pytest.mark.parametrize("damage", ["truncated state", "truncated weights", "planted pickle", "missing entry",
                                    "nan weights"])
def test_a_damaged_checkpoint_is_one_sentence(world, tmp_path, capsys, damage):
    out = tmp_path / "out"
    run(world, out, steps=1)
    ckpt = out / "checkpoints" / "step-000001"
    marker = tmp_path / "pwned"
    if damage == "truncated state":
        (ckpt / "state.pt").write_bytes((ckpt / "state.pt").read_bytes()[:500])
    elif damage == "truncated weights":
        data = (ckpt / "unet.safetensors").read_bytes()
        (ckpt / "unet.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "planted pickle":
        torch.save({"step": 1, "x": Payload(str(marker))}, ckpt / "state.pt")
    elif damage == "nan weights":  # not "the last good checkpoint" to train on from
        weights, _ = files.read_tensors(ckpt / "unet.safetensors")
        writes.write_safetensors(ckpt / "unet.safetensors", {k: v * float("nan") for k, v in weights.items()})
    else:
        torch.save({"step": 1}, ckpt / "state.pt")
    err = refused(capsys, base_args(world, out) + ["--resume", "--steps", 2, "--save-dtype", "fp32"])
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: The checkpoint {ckpt} cannot be resumed (") and line.endswith("--overwrite.")
    assert not marker.exists()
    if damage == "nan weights":
        assert "(its unet.safetensors holds NaN or infinite weights)" in line


def a_checkpoint(folder):
    """A checkpoint as train.py saves one (a module trained one step with AdamW), and that module."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    extra = {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 1}, "scaler": {},
             "generator": torch.Generator().get_state(), "drift_base": 0.5,
             "orders": {"instance-0": {"order": torch.randperm(3), "taken": 1}}}
    return state.save_state(folder, 1, {"unet": module}, extra), module


@pytest.mark.parametrize("entry,value", [
    ("optimizer", {"state": {}, "param_groups": "x"}), ("generator", torch.zeros(3)), ("step", "two"),
    ("orders", [1, 2]), ("orders", {"instance-0": {"order": torch.zeros(3), "taken": 1}}), ("drift_base", "x"),
    ("optimizer", "inf moments"), ("unet", "nan weights")])
def test_a_checkpoint_with_entries_of_the_wrong_type_or_nan_is_refused_before_training(tmp_path, entry, value):
    """Valid pickles of the wrong types, or non-finite numbers, in a checkpoint: one sentence naming what is
    wrong, not a TypeError from inside torch, nor a run that diverges again from it."""
    path, module = a_checkpoint(tmp_path)
    assert state.load_state(path, {"unet": module})["step"] == 1  # the checkpoint as saved loads
    entries = torch.load(path / "state.pt", weights_only=True)
    if entry == "unet":
        writes.write_safetensors(path / "unet.safetensors", {k: v * float("nan") for k, v in module.state_dict().items()})
    elif entry == "optimizer" and value == "inf moments":
        entries["optimizer"]["state"][0]["exp_avg"] = torch.full((2, 3), float("inf"))
    else:
        entries[entry] = value
    torch.save(entries, path / "state.pt")
    with pytest.raises(runs.RunError) as e:
        state.load_state(path, {"unet": module})
    message = one_sentence(e)
    assert message.startswith(f"The checkpoint {path} cannot be resumed (its ")
    assert ("unet.safetensors holds NaN or infinite weights" if entry == "unet" else f"'{entry}' entry is damaged") \
        in message


def test_resume_refuses_a_settings_file_with_a_path_that_is_no_path(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"model": 5, "images": "photos"}))
    with pytest.raises(runs.RunError) as e:
        resume.check_resume_settings(tmp_path, {"model": "base.safetensors", "images": "photos"}, given=set())
    assert f"{tmp_path / 'settings.json'} records --model as 5, which is not a path" in one_sentence(e)


def test_a_log_torn_by_a_kill_is_trimmed_to_the_resumed_step(tmp_path):
    """A kill mid-write leaves a partial last line: on --resume it is dropped with the rows after the
    checkpoint, and a last row that lost only its newline is kept and ended, so the next row is whole."""
    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": n, "loss": 0.5}) for n in (1, 2, 3)]
    log.write_text("\n".join(rows) + '\n{"step": 4, "lo')
    runs.trim_log(log, 2)
    assert log.read_text() == rows[0] + "\n" + rows[1] + "\n"
    log.write_text("\n".join(rows))
    runs.trim_log(log, 3)
    assert log.read_text() == "\n".join(rows) + "\n"


def test_resume_after_a_kill_mid_log_line_continues_the_log(world, tmp_path):
    out = run(world, tmp_path / "out", steps=1)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    run(world, out, "--resume", steps=2)
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]


def test_a_damaged_class_prior_cache_file_is_drawn_again(world, tmp_path):
    cache = tmp_path / "cache"
    run(world, tmp_path / "a", "--class-cache", cache, "--drift-images", 0, steps=1)
    (folder,) = cache.iterdir()
    good = (folder / "00001.safetensors").read_bytes()
    (folder / "00001.safetensors").write_bytes(good[:40])
    first = (folder / "00000.safetensors").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="class-prior cache file .*00001.safetensors is damaged"):
        run(world, tmp_path / "b", "--class-cache", cache, "--drift-images", 0, steps=1)
    latent = files.read_tensors(folder / "00001.safetensors")[0]["latent"]  # drawn again
    kept = files.read_tensors(folder / "00000.safetensors")[0]["latent"]
    assert latent.shape == kept.shape and torch.isfinite(latent).all()
    assert (folder / "00000.safetensors").stat().st_mtime_ns == first  # the good one is kept
    # A copy made by a file manager is not ours (it was a ValueError traceback: int("00000 copy")), and a latent
    # of another shape is damaged (it was a size-mismatch traceback, after the run had written settings.json).
    shutil.copy(folder / "00000.safetensors", folder / "00000 copy.safetensors")
    copy = (folder / "00000 copy.safetensors").read_bytes()
    writes.write_safetensors(folder / "00000.safetensors", {"latent": torch.zeros(kept.shape[0], 3, 3)})
    with pytest.warns(UserWarning, match="class-prior cache file .*00000.safetensors is damaged"):
        run(world, tmp_path / "c", "--class-cache", cache, "--drift-images", 0, steps=1)
    assert files.read_tensors(folder / "00000.safetensors")[0]["latent"].shape == kept.shape
    assert (folder / "00000 copy.safetensors").read_bytes() == copy  # the user's, left alone


# ---- the README's command, twice; Ctrl-C before training ----

def test_default_runs_get_fresh_numbered_folders_and_runs_latest(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = base_args(world, "X")
    del args[args.index("--out"):args.index("--out") + 2]
    for n in (1, 2):
        train.main([str(a) for a in args + ["--steps", 1, "--save-dtype", "fp32"]])
        assert (tmp_path / "runs" / f"dreambooth-{n}" / "model.safetensors").is_file()
        assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / f"dreambooth-{n}").resolve()
    train.main([str(a) for a in args + ["--steps", 2, "--resume", "--save-dtype", "fp32"]])  # continues runs/latest
    assert runs.latest_state(tmp_path / "runs" / "dreambooth-2" / "checkpoints").name == "step-000002"
    assert not (tmp_path / "runs" / "dreambooth-3").exists()


def test_a_new_run_is_numbered_past_the_highest_not_in_a_gap(tmp_path, monkeypatch):
    """With dreambooth-2 deleted, the next run took 2 again: older than 3 by its number, newer by its date.
    And a folder another run made between the look and the mkdir was a FileExistsError traceback."""
    for name in ("dreambooth-1", "dreambooth-3", "dreambooth-x", "dreambooth-\u0663", "other-7"):
        (tmp_path / name).mkdir()
    assert runs.new_run_folder(tmp_path) == tmp_path / "dreambooth-4" and (tmp_path / "dreambooth-4").is_dir()
    assert runs.new_run_folder(tmp_path / "first") == tmp_path / "first" / "dreambooth-1"  # (made, with runs/)
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))  # as if looked before dreambooth-1 was made
    assert runs.new_run_folder(tmp_path / "first") == tmp_path / "first" / "dreambooth-2"


def test_a_run_that_stops_before_it_begins_leaves_no_run_folder(world, tmp_path, monkeypatch):
    """A typo in --images, found when the photos load (after the run folder is taken), left an empty
    runs/dreambooth-N holding only .lock, pointed runs/latest at it (so `--resume` alone and the last run's
    sample.py command broke), and used up its number; an --out it made stayed behind too."""
    monkeypatch.chdir(tmp_path)
    args = base_args(world, "X")
    del args[args.index("--out"):args.index("--out") + 2]
    train.main([str(a) for a in args + ["--steps", 1, "--save-dtype", "fp32"]])
    bad = [str(a) for a in args + ["--steps", 1]]
    bad[bad.index("--images") + 1] = str(tmp_path / "photoz")
    for out in ([], ["--out", str(tmp_path / "new")], ["--out", str(tmp_path / "empty")]):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as e:
            train.main(bad + out)
        assert e.value.code == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dreambooth-1", "latest"]
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / "dreambooth-1").resolve()
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []  # as found
    with pytest.raises(SystemExit):  # the folders made on the way to a new --out go too
        train.main(bad + ["--out", str(tmp_path / "new" / "deeper" / "run")])
    assert not (tmp_path / "new").exists()
    train.main([str(a) for a in args + ["--steps", 2, "--resume", "--save-dtype", "fp32"]])  # the last run, still
    assert runs.latest_state(tmp_path / "runs" / "dreambooth-1" / "checkpoints").name == "step-000002"
    shutil.rmtree(tmp_path / "runs")  # the first run ever: runs/ itself is made for it, and goes with it
    with pytest.raises(SystemExit):
        train.main(bad)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_setup_is_one_sentence_and_leaves_no_run(world, tmp_path, signum):
    """SIGTERM (a scheduler's stop, `kill`) ended the process at once, exit 143 and no word, and left the run's
    folder holding its .lock alone: only train.py's loop took it, as it takes Ctrl-C."""
    args = base_args(world, tmp_path / "out") + ["--class-images", 400, "--class-cache", tmp_path / "cache"]
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cache").glob("*/00000.safetensors")):
        time.sleep(0.05)  # drawing the class prior: before the first training step
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err  # the shell's codes: 130, 143
    assert "interrupted" in err and "Traceback" not in err
    assert "one stopped before its first checkpoint (a new run, or one --overwrite began again) leaves nothing to " \
           "continue." in err  # not only "continue it with --resume"
    assert not (tmp_path / "out").exists()  # the run had not begun: its folder goes


SIGTERM_MID_WRITE = """import os, signal, sys
from pathlib import Path
from minidb.cli import run
from minidb.writes import atomic_write

def write(tmp):
    Path(tmp).write_text("half")
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop, in the middle of an export
    Path(tmp).write_text("whole")

run(lambda: atomic_write(sys.argv[1], write))
"""


SIGTERM_TWICE = """import os, signal, sys, time
from pathlib import Path
from minidb.cli import run

def main():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    finally:  # the clean-up, which a second SIGTERM (SLURM and torchrun each pass one on) cut short
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        Path(sys.argv[1]).write_text("cleaned up")

run(main)
"""


def test_a_second_sigterm_does_not_cut_the_clean_up_short(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SIGTERM_TWICE, str(tmp_path / "done")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "interrupted.", proc.stderr
    assert (tmp_path / "done").read_text() == "cleaned up"


def test_sigterm_in_the_middle_of_a_write_leaves_no_temporary_file(tmp_path):
    """Outside train.py's loop SIGTERM ended the process at once: an export cut short left its temporary file
    (.model.safetensors.RANDOM.tmp, 2 GB for SD 1.5), which neither --resume nor --overwrite removes."""
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(tmp_path / "out" / "model.safetensors")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "interrupted." and "Traceback" not in proc.stderr, proc.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("script", ["train.py", "sample.py", "minidb.info"])
def test_ctrl_c_while_torch_imports_is_quiet(tmp_path, script):
    # Half a second in, the script is importing torch (or already setting up): either way a sentence.
    command = ["-m", script] if script == "minidb.info" else [str(ROOT / script)]
    proc = subprocess.Popen([sys.executable, *command, "--help"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 0), err  # 0: --help had already finished
    assert "Traceback" not in err


# ---- what the run writes ----

def test_frozen_parts_are_exported_bit_identical_in_the_base_dtype(world, tmp_path):
    out = tmp_path / "out"
    train.main([str(a) for a in base_args(world, out) + ["--steps", 1]])  # no --save-dtype
    base, trained = load(world / "base"), load(out / "model.safetensors")
    for part in ("vae", "text_encoder"):
        a, b = getattr(base, part).state_dict(), getattr(trained, part).state_dict()
        assert all(a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), part


def test_loss_plot_pieces():
    assert plot.ema([4.0, 4.0, 4.0], span=9) == [4.0, 4.0, 4.0]  # bias-corrected: no pull towards 0
    a = 2 / (3 + 1)
    assert plot.ema([0.0, 1.0], span=3)[1] == pytest.approx(a / (1 - (1 - a) ** 2))
    assert plot.nice_ticks(0, 0.23) == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    assert plot.nice_ticks(1, 800) == pytest.approx([200, 400, 600, 800])


def test_loss_plot_draws_both_smoothed_curves(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"step": s + 1, "instance_loss": 0.3 + 0.2 * torch.rand(1, generator=g).item() * (s % 7 == 0),
             "prior_loss": 0.1 + 0.001 * s} for s in range(200)]
    plot.plot_losses(rows, tmp_path / "loss.png")
    image = Image.open(tmp_path / "loss.png").convert("RGB")
    pixels = {image.getpixel((x, y)) for x in range(image.width) for y in range(image.height)}
    for _, color in plot.SERIES.values():
        assert color in pixels  # the moving average
        assert tuple(c + (255 - c) // 2 for c in color) in pixels  # the raw points, faint


def test_loss_plot_legend_fits_a_long_run(tmp_path):
    """With the first command's 1,200 steps and its drift score the legend ran off the picture's right edge
    ('dashed: base mod')."""
    rows = [{"step": s, "instance_loss": 0.3, "prior_loss": 0.1} for s in range(1, 1201)]
    rows[-1].update(drift=0.12, drift_base=0.11)
    plot.plot_losses(rows, tmp_path / "loss.png")
    image = Image.open(tmp_path / "loss.png").convert("RGB")
    legend = {(x, y) for x in range(image.width) for y in range(28) if image.getpixel((x, y)) != (255, 255, 255)}
    assert legend and max(x for x, _ in legend) < image.width - 20  # it ends inside the plot's width


def test_first_non_finite_names_the_tensor_and_is_not_fooled_by_a_sum_that_overflows():
    """The batched check behind refusing NaN base models and checkpoints: one sum per tensor, then a look at
    the tensor itself, so that finite numbers whose sum overflows fp32 pass."""
    assert writes.first_non_finite({"a": torch.ones(2), "big": torch.full((4,), 3e38)}) is None
    assert writes.first_non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "i": torch.arange(3)}) == "b"
    assert writes.first_non_finite({"h": torch.tensor([1.0, float("-inf")], dtype=torch.float16)}) == "h"
    assert writes.first_non_finite({"empty": torch.ones(0), "ids": torch.arange(4)}) is None
    nan8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)  # torch has no isfinite for fp8 (it raised)
    assert writes.first_non_finite({"ok": torch.ones(2, dtype=torch.float8_e4m3fn), "fp8": nan8}) == "fp8"
