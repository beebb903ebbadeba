"""`python -m minidb.toy.lab train-base` is resumable: a run cut off in either stage and continued
with --resume writes the same model as one that ran straight through."""

import pytest
import torch

from minidb.files import read_tensors, write_safetensors
from minidb.toy import base, lab, measure

TINY = ["--vae-steps", "3", "--vae-ch", "32", "--steps", "4", "--batch", "2", "--pictures", "8", "--save-every", "2"]


@pytest.fixture(autouse=True)
def small_latent_rescale(monkeypatch):
    """train-base measures the latents' spread on 512 fresh pictures, a third of a tiny run's time;
    32 do for the plumbing these tests check (every run here measures the same way)."""
    rescale = base.rescale_latents
    monkeypatch.setattr(base, "rescale_latents", lambda vae, seed: rescale(vae, seed, n=32))


def train_base(tmp_path, name, *extra):
    out = tmp_path / f"{name}.safetensors"
    lab.main(["train-base", "--out", str(out), "--work", str(tmp_path / name), *TINY, *extra])
    return out


@pytest.mark.parametrize("stage, stop_at", [("vae", 2), ("unet", 2)])
def test_an_interrupted_base_run_resumes_to_the_same_model(tmp_path, monkeypatch, stage, stop_at):
    straight = read_tensors(train_base(tmp_path, "straight"))[0]
    save = base.checkpoint

    def cut_off(folder, step, *args, **kwargs):  # Ctrl-C right after the checkpoint of `stop_at`
        save(folder, step, *args, **kwargs)
        if folder.name == stage and step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(base, "checkpoint", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train_base(tmp_path, "cut")
    assert not (tmp_path / "cut.safetensors").exists()
    monkeypatch.setattr(base, "checkpoint", save)
    resumed = read_tensors(train_base(tmp_path, "cut", "--resume"))[0]
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_train_base_refuses_to_clobber_or_change_a_run(tmp_path, capsys):
    train_base(tmp_path, "run")
    for extra, words in ((), "--resume"), (("--resume", "--lr", "1e-3"), "--lr is 0.001 now"):
        with pytest.raises(SystemExit) as e:
            train_base(tmp_path, "run", *extra)
        assert e.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        lab.main(["train-base", "--vae-ch", "48"])
    assert e.value.code == 2 and "multiple of 32" in capsys.readouterr().err
    kept = {f: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()}
    with pytest.raises(SystemExit) as e:  # a VAE file that cannot be read loses nothing, even with --overwrite
        train_base(tmp_path, "run", "--overwrite", "--vae-from", str(tmp_path / "nope.safetensors"))
    assert e.value.code == 2 and "No model at" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()} == kept


def test_off_palette_counts_smeared_pixels_and_no_drawn_ones():
    """The smear measure: every pixel PIL draws is a world colour (0 off-palette); a blur of the same
    picture mixes colours at every edge; random rainbow noise is almost all off-palette."""
    import random
    from minidb.toy.probe import off_palette, palette
    from minidb.toy.world import COLOURS, WHITE, random_scene, render
    colours = {tuple(((c + 1) * 127.5).round().int().tolist()) for c in palette()}
    assert set(COLOURS.values()) | {WHITE} <= colours
    pictures = base.to_tensor([render(random_scene(random.Random(i))) for i in range(8)])
    assert off_palette(pictures).max() == 0
    blurred = torch.nn.functional.avg_pool2d(pictures, 5, stride=1, padding=2, count_include_pad=False)
    assert 0.02 < off_palette(blurred).mean() < 0.5
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert off_palette(noise).min() > 0.6  # the 22 colours, each with a ball of radius 0.3, fill a fifth of the cube


def test_tune_sweeps_the_learning_rate_on_the_tuning_subject_only(tmp_path, monkeypatch):
    """`lab tune` trains each rate with train.py on the tuning subject (a ball), never the reported one, and
    measures it against that subject. Two rates, one seed, a few steps: the plumbing, not the result."""
    import json
    monkeypatch.setattr(lab, "TUNING_EXAMPLES", tmp_path / "tuning-subject")
    train_args = f"--steps 2 --class-images 2 --drift-images 2 --sample-steps 2 --mixed-precision no " \
                 f"--class-cache {tmp_path / 'cache'}"
    lab.main(["tune", "--lrs", "1e-4", "2e-4", "--seeds", "0", "--n", "1", "--steps", "2", "--out", str(tmp_path / "runs"),
              "--train-args", train_args, "--json", str(tmp_path / "tune.json"), "--picture", str(tmp_path / "tune.png")])
    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")
    result = json.loads((tmp_path / "tune.json").read_text(), parse_constant=strict)
    assert result["drift score vs PRES, Pearson r"] is None  # two runs make no correlation
    assert list(result["columns"]) == ["base model", "lr 1e-4", "lr 2e-4"]
    for name, lr in (("lr-1e-4", 1e-4), ("lr-2e-4", 2e-4)):
        settings = json.loads((tmp_path / "runs" / f"{name}-seed0" / "settings.json").read_text())
        assert settings["lr"] == lr and settings["class_name"] == lab.TUNING_SUBJECT
        assert settings["images"] == str(tmp_path / "tuning-subject")
    assert sorted(p.name for p in (tmp_path / "tuning-subject").iterdir()) == [f"{i}.png" for i in range(5)]
    assert {"subject rate, in a place", "place asked for"} <= set(result["columns"]["lr 1e-4"])
    logged = [json.loads(line) for line in open(tmp_path / "runs" / "lr-1e-4-seed0" / "log.jsonl")]
    assert result["per_seed"]["lr 1e-4"][0]["drift score"][0] == logged[-1]["drift"]  # each run's own, from train.py


def test_evaluate_draws_the_subject_in_every_place(tmp_path, capsys):
    """`lab evaluate --picture` lays out the subject's generations: a row per place, a column per seed."""
    from PIL import Image
    lab.main(["evaluate", "--n", "2", "--steps", "2", "--picture", str(tmp_path / "placed.png")])
    picture = Image.open(tmp_path / "placed.png")
    assert picture.size == (2 * 2 * base.SIZE, 2 * len(measure.PLACES) * base.SIZE)
    row = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| subject rate, in a place |") for line in row)


def test_generate_in_bf16_changes_the_arithmetic_not_the_picture():
    """lab's bf16 sampling (as sample.py's CPU default) really runs in bf16: the pictures differ from fp32's
    in the last bits, and stay the same pictures (mean difference far below one colour step of the world)."""
    from minidb.fetch import TOY_MODEL
    from minidb.load import load
    model = load(TOY_MODEL, dtype=torch.float32)
    fp32 = measure.generate(model, "a photo of a red ball on the snow", 1, 0, 2)
    bf16 = measure.generate(model, "a photo of a red ball on the snow", 1, 0, 2, bf16=True)
    difference = (fp32 - bf16).abs()
    assert difference.max() > 0 and difference.mean() < 0.05  # 0.05 on [-1, 1] is 6/255


def lab_error(capsys, *argv):
    """Run the lab with bad input -> its one line of stderr, after checking exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as e:
        lab.main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.splitlines()[-1]


def test_bad_models_and_paths_end_in_one_sentence(tmp_path, capsys):
    """A missing or corrupt --model/--probe/--vae-from, or an --out the lab cannot write, fails before any
    training or sampling with one sentence and exit code 2."""
    nope, trunc, afile = tmp_path / "nope.safetensors", tmp_path / "trunc.safetensors", tmp_path / "afile"
    trunc.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")  # a header length, then the header cut off
    afile.write_text("keep me")
    not_probe = tmp_path / "not-probe.safetensors"
    write_safetensors(not_probe, {"weight": torch.zeros(2)})
    cases = [(["evaluate", "--probe", str(not_probe), "--n", "1", "--steps", "1"], f"{not_probe} is not a toy probe"),
             (["evaluate", "--model", str(nope), "--identifier", "zq", "--n", "1", "--steps", "1"], f"No model at {nope}"),
             (["evaluate", "--probe", str(trunc), "--n", "1", "--steps", "1"], f"{trunc} is not a readable safetensors file"),
             (["train-base", "--vae-from", str(nope), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o.safetensors"),
               *TINY], f"No model at {nope}"),
             (["examples", "--out", str(afile)], f"{afile} is a file, not a folder; choose another path."),
             (["examples", "--out", str(afile / "sub")], f"{afile} is a file, not a folder; choose another path.")]
    for argv, words in cases:
        line = lab_error(capsys, *argv)
        assert line.startswith(f"error: {words}") and line.endswith("."), line
    assert afile.read_text() == "keep me" and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("argv", [["evaluate", "--n", "0"], ["evaluate", "--steps", "0"], ["evaluate", "--seed", "-1"],
                                  ["tune", "--n", "0"], ["methods", "--steps", "0"], ["train-probe", "--seed", "-1"]])
def test_counts_are_checked_before_any_work(monkeypatch, capsys, argv):
    def no_work(args):
        raise AssertionError(f"{args.command} started with {argv[1]} {argv[2]}")
    for command in ("run_evaluate", "run_compare", "run_train_probe"):
        monkeypatch.setattr(lab, command, no_work)
    assert f"argument {argv[1]}:" in lab_error(capsys, *argv)



def test_examples_of_the_tuning_subject_never_overwrite_the_shipped_photos(tmp_path, monkeypatch, capsys):
    """`examples --tuning` without --out wrote the tuning subject over examples/two-tone-cup/, the shipped
    photos the README's first command trains on. Its own default is the tuning subject's folder."""
    shipped, tuning = tmp_path / "two-tone-cup", tmp_path / "tuning-subject"
    monkeypatch.setattr(lab, "EXAMPLES", shipped)
    monkeypatch.setattr(lab, "TUNING_EXAMPLES", tuning)
    lab.main(["examples", "--tuning"])
    assert not shipped.exists() and sorted(p.name for p in tuning.iterdir()) == [f"{i}.png" for i in range(5)]
    lab.main(["examples"])
    assert sorted(p.name for p in shipped.iterdir()) == [f"{i}.png" for i in range(5)]
    assert all((shipped / f"{i}.png").read_bytes() != (tuning / f"{i}.png").read_bytes() for i in range(5))

def test_a_failed_train_py_run_ends_the_sweep_with_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab, "TUNING_EXAMPLES", tmp_path / "tuning-subject")
    line = lab_error(capsys, "tune", "--seeds", "0", "--out", str(tmp_path / "runs"), "--train-args=--no-such-flag")
    assert line == "error: train.py stopped with exit code 2; fix what it says above and run again."


def test_the_command_exits_2_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, "-m", "minidb.toy.lab", "examples", "--out", "afile"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(lab.ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: afile is a file, not a folder; choose another path.\n"
