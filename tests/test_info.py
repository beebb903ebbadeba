"""`python -m minidb.info`: describes a model, converts it, and fails with one line on bad input."""

import subprocess
import sys
from pathlib import Path

import torch

from minidb import text_encoder as te, unet as un, vae as va
from minidb.load import StableDiffusion, load
from minidb.save import save_single_file
from minidb.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "-m", "minidb.info", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_describes_and_converts_a_model(tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion(Tokenizer.for_version("SD 2.x"), te.TextEncoder(te.TINY), va.AutoencoderKL(va.TINY),
                            un.UNet(un.TINY), "SD 2.x", "v_prediction")
    save_single_file(model, tmp_path / "m.safetensors")
    r = run(tmp_path / "m.safetensors", "--convert", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    assert "SD 2.x, predicts v_prediction" in r.stdout and "pads with id 0" in r.stdout
    n = sum(p.numel() for p in model.unet.parameters()) / 1e6
    assert f"{n:.1f} M params" in r.stdout.splitlines()[1]

    again = load(tmp_path / "folder")  # the converted diffusers folder holds the same model
    assert again.prediction_type == "v_prediction"
    assert all(torch.equal(a, b) for a, b in zip(again.unet.state_dict().values(), model.unet.state_dict().values()))

    r = run(tmp_path / "folder", "--prediction-type", "epsilon")
    assert r.returncode == 0 and "predicts epsilon" in r.stdout


def test_bad_model_is_one_line_without_traceback(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"not a model")
    r = run(tmp_path / "m.safetensors")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
