"""train.py's runs are never lost, locked or poisoned: bad numbers are refused before any work, a NaN
stops the run before it is saved, checkpoints survive a kill at any instant and a full disk, and Ctrl-C
before training leaves no run behind. (--resume, --overwrite and damaged run files: test_resume.py. The
table of bad inputs and their messages is docs/bad-input.md.)"""

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import train
from minidb import files, plot, runs, state, writes
from minidb.load import load
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
