"""A run folder always names its way out: --resume finds the run it is given and continues only the same
run, --overwrite deletes only a run and keeps the old one until the new one has set up, one folder holds one
run, and a damaged checkpoint, settings file, log or class-prior cache is one sentence or is mended. (The table
of bad inputs and their messages is docs/bad-input.md.)"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

import train
from minidb import files, options, resume, runs, state, writes
from minidb.load import load
from test_bad_input import Payload, one_sentence
from test_runs import base_args, refused
from test_train import ROOT, run, world  # noqa: F401  (world is a fixture)


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


def test_a_checkpoint_folder_continues_its_own_run_not_runs_latest(world, tmp_path, capsys, monkeypatch):
    """`--resume RUN/checkpoints/step-N` without --out continued runs/latest: another run, rewritten with this
    one's steps where the two shared their settings (a run of the same recipe), refused for flags never typed
    where they did not. It now continues RUN, from its own or a set-aside checkpoint; a checkpoint outside any
    run's folder is refused, naming --out."""
    monkeypatch.chdir(tmp_path)
    twin = run(world, tmp_path / "twin", "--save-every", 1, "--checkpoints-keep", 2, steps=2)
    latest = run(world, tmp_path / "latest", steps=2)  # the same recipe: a resume's settings check passes it
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(latest)
    untouched = {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()}
    train.main([str(a) for a in ["--resume", twin / "checkpoints" / "step-000001", "--steps", 3]])
    assert {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()} == untouched
    assert [json.loads(line)["step"] for line in open(twin / "log.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (twin / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert [p.name for p in (twin / "checkpoints" / "abandoned").iterdir()] == ["step-000002"]
    train.main([str(a) for a in ["--resume", twin / "checkpoints" / "abandoned" / "step-000002", "--steps", 4]])
    assert [json.loads(line)["step"] for line in open(twin / "log.jsonl")] == [1, 2, 3, 4]
    # the branch it leaves (steps 2 and 3 of the run above) is set aside, not written over and rotated away
    assert sorted(p.name for p in (twin / "checkpoints" / "abandoned").iterdir()) == \
        ["step-000002", "step-000002-2", "step-000003"]
    assert sorted(p.name for p in (twin / "checkpoints").glob("step-*")) == ["step-000003", "step-000004"]
    assert {p: p.read_bytes() for p in latest.rglob("*") if p.is_file()} == untouched
    loose = tmp_path / "loose"
    shutil.copytree(twin / "checkpoints" / "step-000004", loose)
    assert f"error: --resume {loose} is a checkpoint outside any run's folder, so which run it continues is not " \
           "known; name the run with --out RUN.\n" in refused(capsys, ["--resume", loose, "--steps", 5])
    train.main([str(a) for a in ["--out", twin, "--resume", loose, "--steps", 5]])  # named: a copy of any name
    assert [json.loads(line)["step"] for line in open(twin / "log.jsonl")] == [1, 2, 3, 4, 5]
    assert "step-000004" in {p.name for p in (twin / "checkpoints" / "abandoned").iterdir()}  # written over, else


def test_a_run_begun_with_relative_paths_resumes_from_another_folder(world, tmp_path, monkeypatch):
    """The settings recorded --model, --images and --class-cache as typed, so a resume from another working
    folder was refused for a model "sd1" it could not find, and then for photos given by their full path. They
    are recorded absolute (a link kept as a link), and the resume takes them from there."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(world / "photos", here / "photos")
    (here / "base").symlink_to(world / "base")
    monkeypatch.chdir(here)
    train.main([str(a) for a in ["--images", "photos", "--class", "ball", "--model", "base", "--out", "run",
                                 "--class-cache", "cache", "--steps", 1, "--resolution", 32, "--sample-steps", 2,
                                 "--class-images", 2, "--drift-images", 2, "--mixed-precision", "no"]])
    settings = json.loads((here / "run" / "settings.json").read_text())
    assert (settings["images"], settings["model"], settings["class_cache"]) == \
        (str(here / "photos"), str(here / "base"), str(here / "cache"))
    monkeypatch.chdir(elsewhere)
    train.main(["--resume", str(here / "run"), "--steps", "2"])
    assert [json.loads(line)["step"] for line in open(here / "run" / "log.jsonl")] == [1, 2]
    assert not any(elsewhere.iterdir())  # the prior came from the run's cache, not a new one here
    train.main(["--resume", str(here / "run"), "--steps", "3", "--images", str(here / "photos"), "--class", "ball"])
    assert [json.loads(line)["step"] for line in open(here / "run" / "log.jsonl")] == [1, 2, 3]


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


def test_a_resume_naming_half_the_subject_says_so(world, tmp_path, capsys):
    """--resume with --images alone (even the run's own) was told "train.py needs the subject: --images FOLDER
    --class NAME", as if starting a run: naming --images gives the subject anew, so the run's --class is not kept."""
    out = run(world, tmp_path / "out", steps=1)
    for given, other in (("--images", "--class"), ("--class", "--images")):
        value = world / "photos" if given == "--images" else "ball"
        assert refused(capsys, ["--out", out, "--resume", given, value, "--steps", 2]).endswith(
            f"error: --resume with {given} gives the run's subject anew, so it needs {other} too; leave {given} out "
            "to continue with the run's own subject.\n")
    train.main([str(a) for a in ["--out", out, "--resume", "--images", world / "photos", "--class", "ball", "--steps", 2]])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]


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
