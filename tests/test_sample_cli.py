"""sample.py as a user runs it: a subprocess on tiny models in a temporary folder."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minidb import text_encoder as te, unet as un, vae as va
from minidb.load import StableDiffusion
from minidb.save import save_diffusers, save_single_file
from minidb.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny model as a diffusers folder and as a single file."""
    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(te.TINY), va.AutoencoderKL(va.TINY),
                            un.UNet(un.TINY), "SD 1.x", "epsilon")
    save_diffusers(model, tmp / "folder")
    save_single_file(model, tmp / "model.safetensors")
    return tmp / "folder", tmp / "model.safetensors"


def sample(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_writes_images_grid_and_a1111_metadata(models, tmp_path):
    folder, single = models
    out = tmp_path / "out"
    r = sample("--model", folder, "--prompt", "a photo of sks dog", "--negative-prompt", "blurry", "--n", "2",
               "--steps", "3", "--seed", "42", "--height", "32", "--width", "48", "--out", out)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-42.png", "00001-42.png", "grid-00000-42.png"]
    for name in files[:2]:
        assert f"wrote {out / name}" in r.stdout
    image = Image.open(out / "00001-42.png")
    assert image.size == (48, 32)
    assert image.text["parameters"] == ("a photo of sks dog\nNegative prompt: blurry\n"
                                        "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 48x32, "
                                        "Model: folder, Batch size: 2, Batch pos: 1")
    assert (image.text["seed"], image.text["sampler"], image.text["steps"]) == ("42", "ddim", "3")
    assert Image.open(out / "grid-00000-42.png").size == (96, 32)  # 2 images side by side

    # the single file gives the very same pixels, and numbering continues instead of overwriting
    r = sample("--model", single, "--prompt", "a photo of sks dog", "--negative-prompt", "blurry", "--n", "2",
               "--steps", "3", "--seed", "42", "--height", "32", "--width", "48", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "00002-42.png").is_file() and (out / "00003-42.png").is_file()
    assert list(Image.open(out / "00000-42.png").getdata()) == list(Image.open(out / "00002-42.png").getdata())


def test_long_prompt_warns_then_runs(models, tmp_path):
    folder, _ = models
    r = sample("--model", folder, "--prompt", "a very " * 60 + "good dog", "--steps", "2", "--height", "32",
               "--out", tmp_path, "--sampler", "euler-a")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "dropped its last" in r.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.parametrize("args,message", [
    (["--height", "30"], "--height must be a positive multiple of 8"),
    (["--width", "0"], "--width must be a positive multiple of 8"),
    (["--steps", "0"], "--steps must be between 1 and 999"),
    (["--n", "0"], "--n must be at least 1"),
    (["--sampler", "plms"], "invalid choice: 'plms'"),
    (["--model", "/no/such/model.safetensors"], "No model at /no/such/model.safetensors"),
])
def test_bad_arguments_fail_clearly_and_write_nothing(models, tmp_path, args, message):
    folder, _ = models
    out = tmp_path / "out"
    r = sample("--model", folder, "--prompt", "x", "--out", out, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_out_folder(models, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    r = sample("--model", models[0], "--prompt", "x", "--out", tmp_path / "file" / "out")
    assert r.returncode == 2 and "Cannot write to --out" in r.stderr and "Traceback" not in r.stderr


def test_missing_sd_weights_say_how_to_get_them(tmp_path):
    from minidb.fetch import DEFAULT_MODEL
    if Path(DEFAULT_MODEL).exists():
        pytest.skip("this clone has the SD 1.5 weights")
    r = sample("--model", DEFAULT_MODEL, "--prompt", "x", "--out", tmp_path)
    assert r.returncode == 2 and "python -m minidb.fetch" in r.stderr
