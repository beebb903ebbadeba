"""`python -m minidb.info`: describes a model, converts it, and fails with one line on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidb import text_encoder as te, unet as un, vae as va
from minidb.info import main
from minidb.load import StableDiffusion, load
from minidb.save import save_single_file
from minidb.tokenizer import Tokenizer
from conftest import tiny_model

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


# ---- --convert never destroys what is there unless asked (issue 11) ----

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m.safetensors"
    save_single_file(tiny_model(), path)
    return path


def error_line(capsys):
    """The one line main() printed on failure, checked to be one sentence."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.endswith(".\n"), err
    return err


def test_convert_refuses_an_existing_target(tiny_file, tmp_path, capsys):
    trained = tmp_path / "trained"
    (trained / "unet").mkdir(parents=True)
    (trained / "unet" / "mine.txt").write_text("a week of training")
    single = tmp_path / "trained.safetensors"
    single.write_bytes(b"my model")
    for target in (trained, single):
        assert main([str(tiny_file), "--convert", str(target)]) == 2
        assert "already exists; pass --overwrite to replace it" in error_line(capsys)
    assert (trained / "unet" / "mine.txt").read_text() == "a week of training"
    assert single.read_bytes() == b"my model"

    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert main([str(tiny_file), "--convert", str(tmp_path / "empty")]) == 0
    assert load(tmp_path / "empty").version == "SD 1.x"


def test_overwrite_replaces_the_target_whole(tiny_file, tmp_path, capsys):
    trained = tmp_path / "trained"
    (trained / "unet").mkdir(parents=True)
    (trained / "unet" / "mine.txt").write_text("old")
    single = tmp_path / "out.safetensors"
    single.write_bytes(b"old")
    for target in (trained, single):
        assert main([str(tiny_file), "--convert", str(target), "--overwrite"]) == 0
        assert load(target).version == "SD 1.x"
    assert not (trained / "unet" / "mine.txt").exists()  # replaced, not merged into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "trained"]  # no temporary debris

    # a folder is not replaced by a file, nor a file by a folder
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "dir.safetensors" / "x").write_text("x")
    assert main([str(tiny_file), "--convert", str(tmp_path / "dir.safetensors"), "--overwrite"]) == 2
    assert "is a folder and would be replaced by a .safetensors file" in error_line(capsys)
    (tmp_path / "plain").write_text("x")
    assert main([str(tiny_file), "--convert", str(tmp_path / "plain"), "--overwrite"]) == 2
    assert "is a file and would be replaced by a diffusers folder" in error_line(capsys)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_convert_to_a_pickle_name_is_refused_not_made_a_folder(tiny_file, tmp_path, capsys, suffix):
    """--convert model.ckpt wants one file; minidb writes no pickles, and it used to make a diffusers folder
    of that name. One sentence names the .safetensors path to use instead, and nothing is written."""
    target = tmp_path / f"model{suffix}"
    assert main([str(tiny_file), "--convert", str(target)]) == 2
    line = error_line(capsys)
    assert f"--convert {target} asks for a {suffix} file, which minidb does not write" in line
    assert f"name it {tmp_path / 'model.safetensors'}" in line
    assert list(tmp_path.iterdir()) == []


def test_convert_into_an_unwritable_place(tiny_file, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for target in ("a-file/out", "a-file/out.safetensors"):  # a folder cannot be made inside a file
        r = run(tiny_file, "--convert", tmp_path / target)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot write") and "Traceback" not in r.stderr


def test_unusable_metadata_is_an_error_not_a_description(tiny_file, tmp_path, capsys):
    with safe_open(str(tiny_file), "pt") as f:
        saved = json.loads(f.metadata()["minidb"])
    save_file(load_file(tiny_file), tmp_path / "m.safetensors",
              metadata={"minidb": json.dumps({**saved, "prediction_type": "banana"})})
    assert main([str(tmp_path / "m.safetensors")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and 'prediction_type "banana"' in err


def test_merge_lora_writes_the_base_plus_the_lora(tiny_file, tmp_path, capsys):
    from minidb.lora import LoRA, save_kohya
    from minidb.lora_files import merge_lora
    model = load(tiny_file)
    lora = LoRA(model, rank=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.normal_()
    save_kohya(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    assert main([str(tiny_file), "--merge-lora", f"{tmp_path / 'l.safetensors'}:0.5",
                 "--convert", str(tmp_path / "merged.safetensors")]) == 0
    expected = load(tiny_file)
    merge_lora(expected, tmp_path / "l.safetensors", 0.5)
    merged = load(tmp_path / "merged.safetensors")
    a, b = merged.unet.state_dict(), expected.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load(tiny_file).unet.state_dict().items())
    assert main([str(tiny_file), "--merge-lora", str(tmp_path / "l.safetensors")]) == 2
    assert "add --convert OUT" in capsys.readouterr().err
