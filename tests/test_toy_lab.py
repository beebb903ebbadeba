"""`python -m minidb.toy.lab train-base` is resumable: a run cut off in either stage and continued
with --resume writes the same model as one that ran straight through."""

import json
from pathlib import Path

import pytest
import torch

from minidb.files import read_tensors
from minidb.writes import write_json, write_safetensors
from minidb.toy import arguments, base, lab, measure

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
    monkeypatch.setattr(lab, "TUNING_EXAMPLES", tmp_path / "not-here")  # (it rendered there, the repo's runs/)
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
        assert settings["images"] == str(tmp_path / "runs" / "tuning-subject")
    assert sorted(p.name for p in (tmp_path / "runs" / "tuning-subject").iterdir()) == [f"{i}.png" for i in range(5)]
    assert not lab.TUNING_EXAMPLES.exists()
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


def test_a_failed_train_py_run_ends_the_sweep_with_one_sentence(tmp_path, capsys):
    line = lab_error(capsys, "tune", "--seeds", "0", "--out", str(tmp_path / "runs"), "--train-args=--no-such-flag")
    assert line == "error: train.py stopped with exit code 2; fix what it says above and run again."


def test_a_finished_run_with_a_damaged_log_ends_the_sweep_with_one_sentence(tmp_path, capsys):
    """A sweep reuses a finished run (README.md written) and sums its log.jsonl: a torn or emptied log was a
    JSONDecodeError or KeyError traceback."""
    run = tmp_path / "runs" / "lr-1e-4-seed0"
    run.mkdir(parents=True)
    (run / "README.md").write_text("finished")
    for log in ('{"step": 1, "step_ti', "", '{"step": 1}\n'):
        (run / "log.jsonl").write_text(log)
        line = lab_error(capsys, "tune", "--lrs", "1e-4", "--seeds", "0", "--out", str(tmp_path / "runs"))
        assert line == f"error: {run / 'log.jsonl'} holds no rows of training (it is missing or damaged); delete " \
                       f"{run} so that the next sweep trains it again."


def test_the_command_exits_2_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, "-m", "minidb.toy.lab", "examples", "--out", "afile"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(lab.ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: afile is a file, not a folder; choose another path.\n"


# ---- bad input and Ctrl-C (the audit of `python -m minidb.toy.lab`) ----

def no_training(monkeypatch):
    """Make train-base's stages fail loudly, so that a test sees whether it got past its checks."""
    def stage(*args, **kwargs):
        raise AssertionError("train-base started training")
    monkeypatch.setattr(base, "train_vae", stage)
    monkeypatch.setattr(base, "train_unet", stage)


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_train_base_only_ever_clears_an_empty_folder_or_its_own(tmp_path, monkeypatch, capsys):
    """train-base --work cleared any folder without a settings.json (a thesis folder, `.`, runs/), and with
    --overwrite any folder with one (a train.py run). Now it refuses every folder that is not its own."""
    no_training(monkeypatch)
    thesis = tmp_path / "d"
    (thesis / "runs" / "dreambooth-1").mkdir(parents=True)
    (thesis / "thesis.pdf").write_text("four years")
    (thesis / "runs" / "dreambooth-1" / "model.safetensors").write_text("w")
    run_folder = tmp_path / "run"  # a train.py run: a settings.json, but not train-base's
    run_folder.mkdir()
    (run_folder / "settings.json").write_text('{"identifier": "zq", "lr": 1e-06}')
    (run_folder / "log.jsonl").write_text("{}\n")
    editor = tmp_path / ".vscode"  # nothing but a settings.json, and another program's
    editor.mkdir()
    (editor / "settings.json").write_text('{"editor.fontSize": 12}')
    kept = {folder: tree(folder) for folder in (thesis, run_folder, editor)}
    out = str(tmp_path / "o.safetensors")
    for work, words in ((thesis, "runs, thesis.pdf"), (run_folder, "log.jsonl"),
                        (editor, "its settings.json is missing or is not a train-base recipe")):
        for extra in ([], ["--overwrite"]):
            line = lab_error(capsys, "train-base", "--work", str(work), "--out", out, *TINY, *extra)
            assert line == f"error: --work {work} holds files that are not a train-base run ({words}); choose a new " \
                           "or empty folder.", line
    monkeypatch.chdir(thesis)
    line = lab_error(capsys, "train-base", "--work", ".", "--out", out, *TINY)
    assert line.startswith("error: --work . holds files that are not a train-base run")
    assert "argument --work: must not be empty" in lab_error(capsys, "train-base", "--work", "", "--out", out)
    assert {folder: tree(folder) for folder in kept} == kept


def test_train_base_overwrite_clears_its_own_run(tmp_path, monkeypatch):
    """What --overwrite does clear: a folder of train-base's files whose settings.json is its recipe, or whose
    settings.json is damaged but which holds its checkpoints; then the new recipe is written."""
    no_training(monkeypatch)
    recipe = {"seed": 0, "vae_steps": 3, "vae_varied": 0.5, "vae_ch": 32, "vae_from": None, "steps": 4, "batch": 2,
              "lr": 1.5e-3, "pictures": 8}
    for settings in ('{"seed": 5, "vae_steps": 1, "vae_varied": 0, "vae_ch": 64, "vae_from": null, "steps": 1, '
                     '"batch": 1, "lr": 0.1, "pictures": 1}', '{"seed": 0, "vae_st'):
        work = tmp_path / "w"
        (work / "vae" / "step-000002").mkdir(parents=True)
        (work / "unet").mkdir()
        (work / "settings.json").write_text(settings)
        (work / "vae.safetensors").write_text("x")
        (work / ".vae.safetensors.abc123.tmp").write_text("x")  # left by a killed write (atomic_write)
        with pytest.raises(AssertionError, match="started training"):
            train_base(tmp_path, "w", "--overwrite")
        assert sorted(p.name for p in work.iterdir()) == ["settings.json"]
        assert json.loads((work / "settings.json").read_text()) == recipe


def test_damaged_work_and_run_files_end_in_one_sentence(tmp_path, monkeypatch, capsys):
    """A damaged settings.json or vae.safetensors in train-base's --work, or a train.py run's settings.json
    without its identifier, gave JSONDecodeError, AttributeError, a list of 200 missing keys or KeyError."""
    import dataclasses
    from minidb import vae as va
    from minidb.runs import RunError
    out, work = str(tmp_path / "o.safetensors"), tmp_path / "w"
    (work / "vae" / "step-000002").mkdir(parents=True)
    for damaged in ('{"seed": 0, "vae_st', "[1, 2]"):
        (work / "settings.json").write_text(damaged)
        line = lab_error(capsys, "train-base", "--resume", "--work", str(work), "--out", out, *TINY)
        assert line == f"error: --resume cannot read {work / 'settings.json'} (it is damaged, or not the recipe " \
                       "train-base wrote), so it cannot continue the run as it began; start over with --overwrite."
    (work / "vae" / "step-000002").rmdir()  # nothing else of train-base's: not recognisably its run
    assert "holds files that are not a train-base run" in lab_error(
        capsys, "train-base", "--resume", "--work", str(work), "--out", out, *TINY)

    write_json(work / "settings.json", {"seed": 0, "vae_steps": 3, "vae_varied": 0.5, "vae_ch": 32, "vae_from": None,
                                        "steps": 4, "batch": 2, "lr": 1.5e-3, "pictures": 8})
    write_safetensors(work / "vae.safetensors", {"weight": torch.zeros(2)})
    line = lab_error(capsys, "train-base", "--resume", "--work", str(work), "--out", out, *TINY)
    assert line == f"error: {work / 'vae.safetensors'} is not the VAE of this run (its tensors do not fit a " \
                   "--vae-ch 32 VAE); delete it to train stage 1 again, or start over with --overwrite."
    write_safetensors(work / "vae.safetensors", va.AutoencoderKL(dataclasses.replace(base.TOY_VAE, ch=32)).state_dict())
    write_safetensors(work / "unet" / "latents.safetensors", {"means": torch.zeros(1)})  # no scenes
    line = lab_error(capsys, "train-base", "--resume", "--work", str(work), "--out", out, *TINY)
    assert line == f"error: {work / 'unet' / 'latents.safetensors'} is not the encoded world train-base wrote (it is " \
                   "damaged); delete it to encode the world again."

    run = (tmp_path / "m1").resolve()
    run.mkdir()
    for settings in ('{"lr": 1e-06}', '{"identifier": "z', '{"identifier": ""}'):
        (run / "settings.json").write_text(settings)
        line = lab_error(capsys, "evaluate", "--model", str(run / "model.safetensors"), "--n", "1", "--steps", "1")
        assert line == f"error: {run / 'settings.json'} does not name the run's identifier (it is damaged, or not " \
                       "the settings train.py wrote); pass the identifier with --identifier."
        with pytest.raises(RunError, match=f"; delete {run} so that the next run trains it again.$"):
            lab.load_run(run)


def test_a_model_with_nan_weights_is_never_written(tmp_path, monkeypatch, capsys):
    """train-base --lr 1e30 wrote a model of NaN and infinite weights, by default over weights/toy.safetensors.
    Such a --lr is refused now (test_huge_counts_and_seeds_are_refused_before_any_work); and whatever makes the
    weights diverge, the model is not written."""
    import shutil
    from minidb.fetch import TOY_MODEL
    unet_stage = base.train_unet

    def diverged(*args, **kwargs):
        unet, text, tokenizer = unet_stage(*args, **kwargs)
        with torch.no_grad():
            unet.time_embed[0].weight[0, 0] = float("nan")
        return unet, text, tokenizer
    monkeypatch.setattr(base, "train_unet", diverged)
    out = tmp_path / "o.safetensors"
    shutil.copyfile(TOY_MODEL, out)  # an earlier toy base model, which train-base may replace
    earlier = out.read_bytes()
    line = lab_error(capsys, "train-base", "--work", str(tmp_path / "w"), "--out", str(out), "--vae-from", str(TOY_MODEL),
                     "--steps", "1", "--batch", "1", "--pictures", "2")
    assert line == "error: The trained model has NaN or infinite weights (first in unet.time_embed.0.weight), so " \
                   f"{out} was not written (an earlier file there is kept); lower --lr and start over with --overwrite."
    assert out.read_bytes() == earlier
    monkeypatch.setattr(base, "train_unet", unet_stage)  # a loss that is NaN stops the run at that step
    monkeypatch.setattr(base.F, "mse_loss", lambda prediction, target: (prediction - target).mean() * float("nan"))
    line = lab_error(capsys, "train-base", "--work", str(tmp_path / "w"), "--out", str(out), "--vae-from", str(TOY_MODEL),
                     "--steps", "1", "--batch", "1", "--pictures", "2", "--overwrite")
    assert line == "error: The UNet's loss became nan at step 1, so training cannot go on; lower --lr and start over " \
                   "with --overwrite."
    assert out.read_bytes() == earlier


def test_train_base_writes_a_safetensors_name_and_replaces_only_a_toy_base_model(tmp_path, monkeypatch, capsys):
    """train-base --out replaced any file (notes, a LoRA) with exit 0, and wrote safetensors bytes under any name
    (m, m.ckpt), which every script then could not read. It still replaces a toy base model, as the shipped
    weights/toy.safetensors it writes by default. train-probe --out, the same, replaces only a probe."""
    import shutil
    from minidb.fetch import TOY_MODEL
    from minidb.toy.measure import TOY_PROBE
    no_training(monkeypatch)
    notes, lora = tmp_path / "notes.safetensors", tmp_path / "lora.safetensors"
    notes.write_text("my notes")
    write_safetensors(lora, {"lora_unet_out.lora_down.weight": torch.zeros(4, 8)}, metadata={"ss_output_name": "cup"})
    kept = tree(tmp_path)
    for out in (notes, lora):
        line = lab_error(capsys, "train-base", "--out", str(out), "--work", str(tmp_path / "w"), *TINY)
        assert line == f"error: --out {out} is a file that is not a toy base model (a LoRA, a trained model or " \
                       "another file), which train-base does not replace; choose another --out.", line
    for out in (tmp_path / "m", tmp_path / "new" / "m.ckpt"):
        line = lab_error(capsys, "train-base", "--out", str(out), "--work", str(tmp_path / "w"), *TINY)
        assert line == f"error: --out {out} does not end in .safetensors, and train-base writes a safetensors file; " \
                       f"name it {out.with_suffix('.safetensors')}.", line
    assert tree(tmp_path) == kept  # nothing replaced, no --work, no folder made for the refused name

    for out in (lora, TOY_MODEL):  # train-probe likewise replaces only a probe (it replaced any file)
        line = lab_error(capsys, "train-probe", "--out", str(out), "--steps", "1")
        assert line == f"error: --out {out} is a file that is not a toy probe (a LoRA, a trained model or " \
                       "another file), which train-probe does not replace; choose another --out.", line
    line = lab_error(capsys, "train-probe", "--out", str(tmp_path / "probe"), "--steps", "1")
    assert line == f"error: --out {tmp_path / 'probe'} does not end in .safetensors, and train-probe writes a " \
                   f"safetensors file; name it {tmp_path / 'probe.safetensors'}.", line
    assert arguments.is_probe(TOY_PROBE) and not arguments.is_probe(notes)
    assert tree(tmp_path) == kept

    earlier = tmp_path / "earlier.safetensors"  # a toy base model: replaced, by default the shipped one
    shutil.copyfile(TOY_MODEL, earlier)
    assert arguments.is_toy_base(earlier) and arguments.is_toy_base(TOY_MODEL)
    for out in (["--out", str(earlier)], []):
        with pytest.raises(AssertionError, match="started training"):
            lab.main(["train-base", *out, "--work", str(tmp_path / f"w{len(out)}"), *TINY])


def test_examples_refuses_a_folder_holding_other_files(tmp_path, monkeypatch, capsys):
    """`examples --out DIR` wrote its photos over DIR's own 0.png and beside DIR's other photos, which train.py
    --images DIR would then train on with them. Its own photos, written before, are written again."""
    from PIL import Image
    mine = tmp_path / "my-dog"
    mine.mkdir()
    Image.new("RGB", (64, 64), "brown").save(mine / "0.png")
    (mine / "park.jpg").write_bytes(b"a photo")
    ours = tmp_path / "ours"
    lab.main(["examples", "--out", str(ours)])
    (ours / ".DS_Store").write_bytes(b"a file manager's")  # hidden: no photo to train.py either
    lab.main(["examples", "--out", str(ours)])  # again: the same photos
    kept = tree(tmp_path)
    for argv, folder, whose in ((["--out", str(mine)], mine, "subject's"), (["--out", str(ours), "--tuning"], ours,
                                                                            "tuning subject's")):
        line = lab_error(capsys, "examples", *argv)
        shown = "0.png, park.jpg" if folder == mine else "0.png, 1.png, 2.png, ..."
        assert line == f"error: {folder} holds files that are not the {whose} five photos ({shown}); choose a new " \
                       "or empty folder.", line
    assert tree(tmp_path) == kept


def test_train_args_split_as_a_shell_does_and_never_set_the_labs_own_flags(tmp_path, monkeypatch, capsys):
    """--train-args was split on spaces, so a quoted prompt reached train.py in pieces; and --out (or --seed,
    --model, ...) in it quietly won over the lab's own, training outside the sweep's folder."""
    import subprocess
    commands = []

    def train_py(cmd):  # stop at the first run, with what it was asked
        commands.append(cmd)
        raise subprocess.CalledProcessError(2, cmd)
    monkeypatch.setattr(lab, "train_py", train_py)
    runs, files = tmp_path / "runs", ["--json", str(tmp_path / "a.json"), "--picture", str(tmp_path / "a.png")]
    lab_error(capsys, "ablation", "--seeds", "0", "--out", str(runs), *files,
              "--train-args=--instance-prompt 'a photo of a [V] cup' --steps 2")
    assert commands[0][-4:] == ["--instance-prompt", "a photo of a [V] cup", "--steps", "2"]
    commands.clear()
    cases = [("ablation", "--out /tmp/zzz", "--out", "--out", "use the lab's --out instead"),
             ("ablation", "--ou=/tmp/zzz", "--ou=/tmp/zzz", "--out", "use the lab's --out instead"),
             ("tune", "--see 3", "--see", "--seed", "use the lab's --seeds instead"),
             ("methods", "--model=m.safetensors", "--model=m.safetensors", "--model", "use the lab's --model instead"),
             ("tune", "--lr 1e-3", "--lr", "--lr", "use the lab's --lrs instead"),
             ("methods", "--meth lora", "--meth", "--method", "leave it out"),
             ("ablation", "--prior-weight=0.5", "--prior-weight=0.5", "--prior-weight", "leave it out"),
             ("ablation", "--images my-dog", "--images", "--images", "leave it out"),
             ("tune", "--overwrite", "--overwrite", "--overwrite", "leave it out")]
    for command, train_args, word, flag, use in cases:
        line = lab_error(capsys, command, "--seeds", "0", "--out", str(runs), *files, f"--train-args={train_args}")
        assert line == f"error: --train-args {word} sets train.py's {flag}, which the lab sets itself; {use}.", line
    line = lab_error(capsys, "ablation", "--out", str(runs), *files, "--train-args=--instance-prompt 'a photo")
    assert line == "error: --train-args --instance-prompt 'a photo cannot be split as a shell splits it (no closing " \
                   "quotation); quote as in a shell, e.g. --train-args \"--instance-prompt 'a photo of a [V] cup'\"."
    assert commands == [] and not runs.exists()  # refused before the tuning photos or any run


COMMANDS = ("run_evaluate", "run_compare", "run_train_probe", "run_base", "train_base", "write_examples")


@pytest.mark.parametrize("argv", [
    ["evaluate", "--seed", str(2**63)], ["train-probe", "--seed", "99999999999999999999999"],
    ["train-base", "--seed", str(2**63)], ["tune", "--seeds", "0", str(2**63)], ["train-base", "--lr", "1e30"],
    ["tune", "--lrs", "1e-4", "5"], ["evaluate", "--n", "1000000000"], ["base", "--n", "65"],
    ["train-base", "--batch", "1000000000"], ["train-base", "--vae-ch", "3200000"], ["train-base", "--vae-ch", "288"],
    ["train-base", "--pictures", "1000000000000"], ["train-base", "--steps", "10000000"],
    ["evaluate", "--steps", "1000"], ["methods", "--steps", "1000"]])
def test_huge_counts_and_seeds_are_refused_before_any_work(monkeypatch, capsys, argv):
    """Seeds past 2**63 - 1 crashed (ValueError: Overflow), huge counts failed to allocate or ran for days."""
    def no_work(*args):
        raise AssertionError(f"{argv[0]} started with {argv[1:]}")
    for command in COMMANDS:
        monkeypatch.setattr(lab, command, no_work)
    line = lab_error(capsys, *argv)
    assert f"argument {argv[1]}: must be" in line and f"not {argv[-1]}" in line, line


def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """`base --picture x` (no extension) failed after all the sampling, `--json` into a missing folder after
    every run; empty --out, --work and --identifier were taken as the current folder or an empty word."""
    made = []
    for command in COMMANDS:  # what each command would find when its work starts
        monkeypatch.setattr(lab, command, lambda args, *rest: made.append(Path(args.json).parent.is_dir()))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    cases = [(["base", "--picture", str(tmp_path / "noext")], f"error: --picture {tmp_path / 'noext'} does not end "
              "in a picture's extension (.png, .jpg, .jpeg, .webp); add one."),
             (["evaluate", "--picture", str(tmp_path / "x.txt")], "error: --picture"),
             (["tune", "--json", str(afile / "t.json")], f"error: {afile} is a file, not a folder; choose another path."),
             (["methods", "--picture", str(afile / "m.png")], f"error: {afile} is a file, not a folder"),
             (["train-base", "--out", str(tmp_path)], f"error: --out {tmp_path} is a folder; give a file name in it."),
             (["train-base", "--out", ""], "argument --out: must not be empty"),
             (["train-probe", "--out", ""], "argument --out: must not be empty"),
             (["examples", "--out", ""], "argument --out: must not be empty"),
             (["evaluate", "--identifier", ""], "argument --identifier: must not be empty"),
             (["evaluate", "--model", ""], "argument --model: must not be empty"),
             (["ablation", "--out", " "], "argument --out: must not be empty")]
    for argv, words in cases:
        line = lab_error(capsys, *argv)
        assert words in line, line
    assert made == [] and afile.read_text() == "keep me"
    lab.main(["ablation", "--json", str(tmp_path / "new" / "folder" / "a.json"), "--picture", str(tmp_path / "a.png")])
    assert made == [True]


def started(path, process, seconds=120):
    """Wait until `path` exists (the process got that far), or fail if the process ends first."""
    import time
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


def test_ctrl_c_ends_the_lab_with_one_sentence(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    lab_run = subprocess.Popen(
        [sys.executable, "-m", "minidb.toy.lab", "train-base", "--work", str(tmp_path / "w"), "--out",
         str(tmp_path / "o.safetensors"), "--vae-steps", "100000", "--vae-ch", "32", "--save-every", "100000"],
        env={**os.environ, "PYTHONPATH": str(lab.ROOT)}, stderr=subprocess.PIPE, text=True)
    started(tmp_path / "w" / "settings.json", lab_run)
    lab_run.send_signal(signal.SIGINT)
    _, err = lab_run.communicate(timeout=60)
    assert lab_run.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "interrupted: run the same command again to continue (train-base with --resume)."


FAKE_TRAIN_PY = """import signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
if "--resume" in sys.argv or "--overwrite" in sys.argv:  # the second sweep: say how it was asked to go on
    (out / "again").write_text(" ".join(sys.argv[1:]))
    sys.exit(2)
asked = []
for signum in (signal.SIGINT, signal.SIGTERM):  # as train.py: finish the step, then save
    signal.signal(signum, lambda *_: asked.append(True))
out.mkdir(parents=True)
(out / "started").write_text("")
while not asked:
    time.sleep(0.05)
time.sleep(1.5)  # the rest of the step, and the checkpoint: longer than subprocess.run's 0.25 s
(out / "checkpoints" / "step-000003").mkdir(parents=True)
sys.exit(130)
"""

SWEEP = """import sys
from pathlib import Path
from minidb.cli import run
from minidb.toy import lab
lab.ROOT = Path(sys.argv[1])  # where train.py is: the fake one
run(lambda: lab.main(sys.argv[2:]), interrupted="interrupted.")
"""


@pytest.mark.parametrize("sigterm", [False, True], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_a_sweep_lets_train_py_save_its_checkpoint(tmp_path, sigterm):
    """A terminal's Ctrl-C reaches the lab and its train.py alike. The lab killed train.py 0.25 s later,
    before the checkpoint train.py saves after a Ctrl-C, and the next sweep started that run over
    (--overwrite). Now it waits for train.py, and the next sweep continues the run (--resume). SIGTERM (`kill`)
    reaches the lab alone: it passes it on to train.py (it waited 5 minutes for a train.py never told to stop)."""
    import os
    import signal
    import subprocess
    import sys
    (tmp_path / "train.py").write_text(FAKE_TRAIN_PY)
    (tmp_path / "sweep.py").write_text(SWEEP)
    run = tmp_path / "runs" / "lr-1e-4-seed0"
    sweep = [sys.executable, str(tmp_path / "sweep.py"), str(tmp_path), "tune", "--lrs", "1e-4", "--seeds", "0",
             "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "t.json"), "--picture", str(tmp_path / "t.png")]
    env = {**os.environ, "PYTHONPATH": str(lab.ROOT)}
    first = subprocess.Popen(sweep, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started(run / "started", first)
    if sigterm:
        first.send_signal(signal.SIGTERM)
    else:
        os.killpg(first.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
    _, err = first.communicate(timeout=60)
    assert first.returncode == (143 if sigterm else 130) and "Traceback" not in err, err
    assert (run / "checkpoints" / "step-000003").is_dir(), err
    second = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "--resume" in (run / "again").read_text().split() and "--overwrite" not in (run / "again").read_text()
    # train.py refusing the resume (other --train-args, say): the way out names the run folder
    assert second.stderr.strip().splitlines()[-1] == f"error: train.py stopped with exit code 2 while resuming {run}; " \
        f"fix what it says above, or delete {run} to train that run over."


def test_every_command_says_what_it_does_and_which_defaults_replace_the_docs_own(capsys, monkeypatch):
    """A command's --help had only its flags: what it does was in the lab's list alone. The pictures and JSON the
    experiments write by default are the docs' own, which a newcomer's first try replaced unwarned."""
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at a path's hyphens (/tmp/ci-clone) otherwise
    with pytest.raises(SystemExit):
        arguments.parse_args(["--help"], "the lab")
    listing = capsys.readouterr().out
    commands = ["examples", "train-base", "train-probe", "evaluate", "base", "ablation", "methods", "tune"]
    checked = []
    for command in commands:
        with pytest.raises(SystemExit):
            arguments.parse_args([command, "--help"], "the lab")
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        description = text.split(" options: ")[0].split("] ")[-1]
        assert description.endswith(".") and description[:-1].lower() in " ".join(listing.split()).lower(), command
        for flag in ("--picture", "--json"):  # a default in the repository (docs/, bench/) is the docs' own
            said = text.split(flag, 2)[-1].split(" --")[0]
            if flag in text and f"(default: {arguments.ROOT}" in said:
                assert "which this replaces" in said, (command, flag)
                checked.append(f"{command} {flag}")
        if command in ("train-probe", "evaluate"):  # their --model's default was not shown
            assert "--model" in text and "(default: " in text.split("--model", 2)[-1].split(" --")[0], command
    assert len(checked) == 7, checked  # base's picture; ablation's, methods' and tune's picture and JSON
