"""DreamBooth training on a tiny model, on photos the tests draw themselves (CPU, offline)."""

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import train
from conftest import assert_close, diffusers
from minidb.dreambooth import dreambooth_loss, min_snr_weights, pick_identifier, rare_tokens
from minidb.files import read_tensors
from minidb.info import main as info
from minidb.load import load
from minidb.runs import recorded_identifiers
from minidb.schedulers import NoiseSchedule
from minidb.tokenizer import Tokenizer
from test_load_save import reference_pipeline

ROOT = Path(__file__).resolve().parent.parent


def draw_subject(path, color, angle, size=48):
    """A 'photo' of our subject: a striped disc on a plain background, in varying poses."""
    image = Image.new("RGB", (size + 16, size), (90, 140, 90))
    d = ImageDraw.Draw(image)
    d.ellipse([8, 4, size - 4, size - 8], fill=color)
    for k in range(0, size, 8):
        d.line([(8 + k, 4), (8 + k + angle, size - 8)], fill=(250, 250, 250), width=2)
    image.save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("world")
    reference_pipeline("SD 1.x", tmp).save_pretrained(tmp / "base")
    (tmp / "photos").mkdir()
    for i, angle in enumerate((0, 6, 12)):
        draw_subject(tmp / "photos" / f"{i}.png", (200, 40 + 30 * i, 30), angle)
    return tmp


def run(world, out, *extra, steps=4, prior=True):
    full = "--method" not in extra or "full" in extra  # --save-dtype is full's alone
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--out", out,
            "--steps", steps, "--resolution", 32, "--sample-steps", 2, "--class-cache", world / "cache",
            *(["--save-dtype", "fp32"] if full else []), *extra]
    if prior and "--class-images" not in extra and "--class-dir" not in extra:
        args += ["--class-images", 2]
    if "--drift-images" not in extra and "textual-inversion" not in extra:  # (textual inversion has no drift)
        args += ["--drift-images", 2]
    if "--mixed-precision" not in extra:  # the exact fp32 path; the CPU's bf16 default has its own tests
        args += ["--mixed-precision", "no"]
    if not prior:
        args += ["--prior-weight", 0]
    train.main([str(a) for a in args])
    return out


def state(path, part):
    return getattr(load(path), part).state_dict()


# ---- the loss and its pieces ----

def test_dreambooth_loss_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    instance = ((pred[0] - target[0]) ** 2).mean()
    prior = ((pred[1] - target[1]) ** 2).mean()
    loss, li, lp = dreambooth_loss(pred, target, n_instance=1, prior_weight=0.7)
    assert torch.allclose(loss, instance + 0.7 * prior) and torch.allclose(li, instance) and torch.allclose(lp, prior)
    w = torch.tensor([2.0, 0.5])
    loss, _, _ = dreambooth_loss(pred, target, 1, 1.0, weights=w)
    assert torch.allclose(loss, 2.0 * instance + 0.5 * prior)
    loss, li, lp = dreambooth_loss(pred[:1], target[:1], 1, 1.0)  # no prior examples
    assert torch.allclose(loss, instance) and lp == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    from diffusers.training_utils import compute_snr
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(ref, t)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(min_snr_weights(NoiseSchedule(prediction_type), t, 5.0), expected, rtol=1e-5)


def test_identifier_is_a_rare_short_single_token():
    tok = Tokenizer.for_version("SD 1.x")
    candidates = rare_tokens(tok)
    assert len(candidates) > 100 and "sks" in candidates and "dog" not in candidates
    for word in candidates:
        (i,) = tok.encode(word)
        assert len(word) <= 3 and i >= 0.8 * len(tok.vocab)
    assert pick_identifier(tok, random.Random(3)) == pick_identifier(tok, random.Random(3))


# ---- end to end ----

def test_end_to_end_run_writes_everything_and_loads_in_diffusers(world, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        out = run(world, tmp_path / "out", "--save-every", 2, "--validate-every", 2)
    # the recipe, said at the start: the first run's minutes go into drawing the prior, which later runs reuse
    assert f"full: 4 steps at lr 5e-06; class prior weight 1 on 2 images per class prompt, drawn once and cached in " \
           f"{world / 'cache'}\n" in capsys.readouterr().out
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not [m for m in unclosed if "log.jsonl" in m], unclosed  # export reads the log and closes it
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["prior_loss"] is not None and r["loss"] > 0 for r in rows)
    for name in ("validation/step-000002.png", "validation/step-000004.png", "loss.png", "README.md",
                 "checkpoints/step-000004/unet.safetensors", "model.safetensors", "model/unet/config.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "validation" / "step-000004.png").size == (96, 32)  # 3 prompts side by side
    identifier = json.load(open(out / "settings.json"))["identifier"]
    assert identifier in (out / "README.md").read_text()
    assert recorded_identifiers([out / "model.safetensors"]) == [identifier]  # sample.py reads [V] as it
    assert recorded_identifiers([out / "model"]) == [identifier]  # the folder too: in its UNet file's header

    # the two exports are the same model; diffusers reads the folder with equal outputs
    single, folder = load(out / "model.safetensors"), load(out / "model")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None)
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert_close(single.unet(x, t, ctx), ref.unet(x, t, ctx).sample)
    base = load(world / "base").unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in single.unet.state_dict().items())  # it did train

    # the folder, as sample.py and info are given it, names the subject that [V] stands for
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(out / "model"), "--prompt",
                        "a photo of a [V] ball", "--steps", "2", "--height", "32", "--out", str(tmp_path / "drawn")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert f"[V] in the prompt is read as {identifier}, the identifier that the train.py run recorded" in r.stdout
    capsys.readouterr()
    assert info([str(out / "model")]) == 0
    line = f"  identifier     {identifier}: the subject train.py trained; sample.py reads [V] as it\n"
    assert line in capsys.readouterr().out


def test_only_trained_parts_change(world, tmp_path):
    base = load(world / "base")
    out = run(world, tmp_path / "unet_only", steps=1)
    trained = load(out / "model")
    changed = lambda part: any(not torch.equal(a, b) for a, b in zip(getattr(base, part).state_dict().values(),
                                                                    getattr(trained, part).state_dict().values()))
    assert changed("unet") and not changed("text_encoder") and not changed("vae")
    out = run(world, tmp_path / "with_text", "--train-text-encoder", steps=1)
    trained = load(out / "model")
    assert changed("unet") and changed("text_encoder") and not changed("vae")


def test_class_prior_cache_is_reused_and_topped_up(world, tmp_path, monkeypatch):
    import minidb.dreambooth
    import minidb.loop
    bars = []  # (label, total, count at the end) of each progress bar the class prior and the last grid show

    class Bar(minidb.dreambooth.tqdm):
        def close(self):
            if not self.disable:
                bars.append((self.desc, self.total, self.n))
            super().close()
    monkeypatch.setattr(minidb.dreambooth, "tqdm", Bar)
    monkeypatch.setattr(minidb.loop, "tqdm", Bar)
    cache = ["--class-cache", tmp_path / "cache", "--drift-images", 0]
    run(world, tmp_path / "a", *cache, steps=1)
    (folder,) = (tmp_path / "cache").iterdir()
    files = {p.name: p.stat().st_mtime_ns for p in folder.glob("0*.safetensors")}
    assert len(files) == 2
    run(world, tmp_path / "b", *cache, "--class-images", 3, "--drift-images", 1, steps=1)
    again = {p.name: p.stat().st_mtime_ns for p in folder.glob("0*.safetensors")}
    assert len(again) == 3 and all(again[k] == v for k, v in files.items())  # the first two untouched
    # each bar ends full, counting the images drawn (not whole batches of 4); the drift watch's is named so;
    # the last validation grid, drawn after training, counts its 3 prompts
    prior, grid = "class prior 'a photo of a ball'", ("validation grid", 3, 3)
    assert bars == [(prior, 2, 2), grid, (prior, 1, 1), ("drift watch 'a photo of a ball'", 1, 1), grid]


# ---- does it learn, and does the prior do what the paper says? ----

def probe_loss(model, latents, ids, seed=0):
    """Denoising error of `model` on fixed latents, noise and timestep."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([500] * len(latents))
    sched = NoiseSchedule(model.prediction_type)
    with torch.no_grad():
        pred = model.unet(sched.add_noise(latents, noise, t), t, model.text_encoder(ids).expand(len(latents), -1, -1))
    return (pred - sched.target(latents, noise, t)).square().mean().item()


def test_instance_loss_falls_when_overfitting_one_image(world, tmp_path):
    photos = tmp_path / "one"
    photos.mkdir()
    draw_subject(photos / "a.png", (200, 40, 30), 0)
    args = ["--images", photos, "--class", "ball", "--model", world / "base", "--out", tmp_path / "out",
            "--steps", 40, "--resolution", 32, "--lr", 1e-3, "--prior-weight", 0, "--save-dtype", "fp32",
            "--sample-steps", 2, "--mixed-precision", "no"]
    train.main([str(a) for a in args])
    base, trained = load(world / "base"), load(tmp_path / "out" / "model")
    ids = base.tokenizer([json.load(open(tmp_path / "out" / "settings.json"))["instance_prompt"]])
    from minidb.data import load_images
    with torch.no_grad():
        latents = base.vae.encode(load_images(photos, 32)[0]).mean * base.vae.cfg.scale_factor
    before, after = probe_loss(base, latents, ids), probe_loss(trained, latents, ids)
    assert after < 0.5 * before, (before, after)


def test_prior_preservation_reduces_class_drift(world, tmp_path, capsys):
    """The paper's claim (section 4.3): without the prior term, the class prompt drifts towards
    the subject. Measure the change of the class prediction on fixed probe inputs."""
    with_prior = run(world, tmp_path / "prior", "--class-images", 4, "--lr", 5e-4, "--drift-images", 8, steps=30)
    capsys.readouterr()
    without = run(world, tmp_path / "none", "--lr", 5e-4, "--drift-images", 8, steps=30, prior=False)
    assert "full: 30 steps at lr 0.0005; class prior off\n" in capsys.readouterr().out
    base = load(world / "base")
    ids = base.tokenizer([json.load(open(with_prior / "settings.json"))["class_prompt"]])
    probe = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 400, 700, 900])

    def drift(path):
        model = load(path / "model")
        with torch.no_grad():
            ctx = base.text_encoder(ids).expand(4, -1, -1)
            return (model.unet(probe, t, ctx) - base.unet(probe, t, ctx)).square().mean().item()

    assert drift(without) > drift(with_prior)
    # train.py's own drift score (held-out class images, minidb/loop.py) says the same, from the same base
    (a,), (b,) = ([r for r in map(json.loads, open(out / "log.jsonl")) if "drift" in r] for out in (without, with_prior))
    assert a["drift_base"] == b["drift_base"] and a["drift"] > b["drift"] > 0


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(world, tmp_path):
    straight = run(world, tmp_path / "straight", steps=6)
    split = run(world, tmp_path / "split", steps=3)
    run(world, split, "--resume", steps=6)
    a, b = state(straight / "model.safetensors", "unet"), state(split / "model.safetensors", "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["loss"] for x in open(straight / "log.jsonl")] == \
           [json.loads(x)["loss"] for x in open(split / "log.jsonl")]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(world, tmp_path, method):
    """Ctrl-C (the full run) or SIGTERM (the LoRA run; how a cluster's scheduler stops a job) ends the step,
    saves a checkpoint, and --resume finishes the same run as one never stopped."""
    args = ["--images", world / "photos", "--class", "ball", "--model", world / "base", "--steps", 40,
            "--resolution", 32, "--sample-steps", 2, "--class-cache", world / "cache", "--class-images", 2,
            "--method", method, *(["--save-dtype", "fp32"] if method == "full" else ["--lora-rank", 2]),
            "--mixed-precision", "no"]
    result = "model.safetensors" if method == "full" else "lora.safetensors"
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT if method == "full" else signal.SIGTERM)  # SIGTERM: a scheduler's stop, or kill
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if method == "full" else 143), err  # it died at once on SIGTERM, saving nothing
    assert ("Ctrl-C" if method == "full" else "SIGTERM") + ": saving a checkpoint after this step" in err, err
    assert "interrupted: saved" in err and not (out / result).exists()
    # Both runs go to three steps past the checkpoint, as a resume with a larger --steps may: the 40 asked
    # for only leave the signal room to land before the run's end.
    (saved,) = (out / "checkpoints").glob("step-*")
    steps = ["--steps", str(int(saved.name[5:]) + 3)]
    assert int(steps[1]) < 40
    train.main([str(a) for a in args] + ["--out", str(out), "--resume", *steps])
    straight = tmp_path / "straight"
    train.main([str(a) for a in args] + ["--out", str(straight), *steps])
    a, b = read_tensors(straight / result)[0], read_tensors(out / result)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input ----

def expect_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_inputs(world, tmp_path, capsys):
    base = ["--class", "ball", "--model", world / "base", "--resolution", 32, "--class-cache", world / "cache"]
    (tmp_path / "empty").mkdir()
    assert "no readable" in expect_error(capsys, "--images", tmp_path / "empty", "--out", tmp_path / "o1", *base)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    assert "no readable" in expect_error(capsys, "--images", tmp_path / "texts", "--out", tmp_path / "o2", *base)
    assert "No model at" in expect_error(capsys, "--images", world / "photos", "--out", tmp_path / "o3", "--class",
                                         "ball", "--model", tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "Cannot write to --out" in expect_error(capsys, "--images", world / "photos", "--out",
                                                   tmp_path / "file" / "o", *base)
    # an existing run is never overwritten by accident
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_bytes(b"precious")
    assert "holds files that are not a minidb run (model.safetensors)" in expect_error(
        capsys, "--images", world / "photos", "--out", tmp_path / "used", "--overwrite", *base)
    assert (tmp_path / "used" / "model.safetensors").read_bytes() == b"precious"
    with pytest.raises(SystemExit):  # argparse: --class is required
        train.main(["--images", str(world / "photos")])
    assert "--class" in capsys.readouterr().err


def test_corrupt_photo_among_good_ones_is_skipped_with_a_warning(world, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in (world / "photos").iterdir():
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        train.main([str(a) for a in ["--images", photos, "--class", "ball", "--model", world / "base", "--out",
                                     tmp_path / "out", "--steps", 1, "--resolution", 32, "--prior-weight", 0,
                                     "--sample-steps", 1]])
    assert (tmp_path / "out" / "model.safetensors").is_file()
