"""sample.py with a LoRA (--lora) and a textual-inversion embedding (--embedding): merged or attached as
AUTOMATIC1111 does, and recorded in the PNG as it records them; files that do not fit the model, or cannot
be read, are one sentence before the model loads. Also the CPU's default precision. (Subprocesses on tiny
models, as in test_sample_cli.py.)"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from test_sample_cli import ROOT, models, parse_a1111, pixels, refusal, sample  # noqa: F401  (models is a fixture)


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """A LoRA with nonzero up weights and a 2-vector embedding for the tiny model, as files."""
    from minidb.dreambooth import NewWord
    from minidb.load import load
    from minidb.lora import LoRA, save_kohya
    tmp = tmp_path_factory.mktemp("adapters")
    model = load(models[1])
    lora = LoRA(model, rank=2, text_encoder=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_kohya(lora, tmp / "style.safetensors")
    NewWord(model, "abz", torch.randn(2, model.text_encoder.cfg.width, generator=g)).save(tmp / "abz.safetensors")
    return tmp / "style.safetensors", tmp / "abz.safetensors"


def addnet_hash(path):
    """A1111's LoRA hash, written out here independently: sha256 of what follows the safetensors header."""
    import hashlib
    data = Path(path).read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_lora_is_merged_and_recorded_as_a1111_does(models, adapters, tmp_path):
    from minidb.load import load
    from minidb.lora_files import merge_lora
    from minidb.pipeline import decode, sample_latents
    lora, _ = adapters
    r = sample("--model", models[1], "--prompt", "a red ball", "--lora", f"{lora}:0.5", "--steps", "3", "--seed", "9",
               "--height", "32", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (png,) = tmp_path.glob("*.png")
    model = load(models[1])
    merge_lora(model, lora, 0.5)
    with torch.no_grad():
        expected = decode(model, sample_latents(model, "a red ball", steps=3, seed=9, height=32, width=32,
                                                progress=False))[0]
    assert pixels(png) == expected.tobytes()  # sample.py drew with the LoRA merged at 0.5
    fields = parse_a1111(Image.open(png).text["parameters"])
    assert fields["Prompt"] == "a red ball <lora:style:0.5>"
    assert fields["Lora hashes"] == f"style: {addnet_hash(lora)}"
    r = sample("--model", models[1], "--prompt", "a red ball", "--steps", "3", "--seed", "9", "--height", "32",
               "--out", tmp_path / "plain")
    assert pixels(next((tmp_path / "plain").glob("*.png"))) != expected.tobytes()  # the LoRA did something


def test_a_lora_saved_as_a_pickle_draws_and_is_hashed_whole_as_a1111_does(models, adapters, tmp_path):
    """diffusers' older scripts wrote LoRAs as pytorch_lora_weights.bin. A pickle has no safetensors header to
    skip, so A1111 hashes the whole file (network.py: the addnet hash only where is_safetensors); sample.py
    crashed reading a header length from the pickle's first bytes."""
    from safetensors.torch import load_file
    lora, _ = adapters
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(load_file(lora), pickled)
    drawn = {}
    for name, path in (("safetensors", lora), ("pickle", pickled)):
        r = sample("--model", models[1], "--prompt", "a red ball", "--lora", path, "--steps", "2", "--seed", "9",
                   "--height", "32", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        drawn[name] = next((tmp_path / name).glob("*.png"))
    assert pixels(drawn["pickle"]) == pixels(drawn["safetensors"])  # the same LoRA, drawn with
    fields = parse_a1111(Image.open(drawn["pickle"]).text["parameters"])
    assert fields["Lora hashes"] == f"pytorch_lora_weights: {hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]}"


def test_embedding_is_a_word_and_recorded_as_a1111_does(models, adapters, tmp_path):
    import hashlib
    _, emb = adapters
    runs = {}
    for name, extra in (("with", ["--embedding", emb]), ("without", [])):
        r = sample("--model", models[1], "--prompt", "a photo of abz", *extra, "--steps", "3", "--seed", "9",
                   "--height", "32", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        runs[name] = next((tmp_path / name).glob("*.png"))
    assert pixels(runs["with"]) != pixels(runs["without"])
    fields = parse_a1111(Image.open(runs["with"]).text["parameters"])
    assert fields["TI hashes"] == f"abz: {hashlib.sha256(emb.read_bytes()).hexdigest()[:12]}"
    assert "TI hashes" not in parse_a1111(Image.open(runs["without"]).text["parameters"])
    # an embedding whose word neither prompt writes changes nothing: a note says so, and the PNG does not list it
    r = sample("--model", models[1], "--prompt", "a photo of a ball", "--embedding", emb, "--steps", "3", "--seed",
               "9", "--height", "32", "--out", tmp_path / "unused")
    assert r.returncode == 0 and "note: neither prompt names abz, so the embedding given for it changes nothing; " \
        "write the word where it belongs in the prompt.\n" in r.stdout, r.stdout + r.stderr
    assert "TI hashes" not in parse_a1111(Image.open(next((tmp_path / "unused").glob("*.png"))).text["parameters"])


def test_an_embedding_whose_name_cannot_be_a_word_is_one_sentence(models, adapters, tmp_path, capsys):
    """The file's name is the word: a name with a space, an existing token, or one word given twice (the
    same file, or one copied under another case) is refused in one sentence that says what to do."""
    _, emb = adapters
    for name in ("my word", "ball", "ABZ"):
        shutil.copy(emb, tmp_path / f"{name}.safetensors")
    cases = [([tmp_path / "my word.safetensors"], "cannot be used as the word 'my word': a new word must be one "
              "lower-case word, not 'my word'; rename the file."),
             ([tmp_path / "ball.safetensors"], "cannot be used as the word 'ball': 'ball' is already a token"),
             ([emb, tmp_path / "ABZ.safetensors"], f"--embedding gives the word 'abz' twice ({emb}, "
              f"{tmp_path / 'ABZ.safetensors'}); give each word once.")]
    for paths, message in cases:
        err = refusal(capsys, "--model", models[1], "--prompt", "x", *[a for p in paths for a in ("--embedding", p)],
                      "--out", tmp_path / "out")
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def a_lora(folder, tensors=None):
    """A file of a LoRA's tensor names (or of `tensors`), for the refusals."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = tensors or {f"{layer}.lora_down.weight": torch.ones(2, 32), f"{layer}.lora_up.weight": torch.ones(32, 2)}
    safetensors.torch.save_file(tensors, folder / "x.safetensors")
    return folder / "x.safetensors"


@pytest.mark.parametrize("flag,make,message", [
    ("--lora", lambda tmp, models: models[1], "is a full model checkpoint, not a LoRA"),
    ("--lora", lambda tmp, models: f"{models[1]}:20", "argument --lora: must be between -10 and 10, not 20"),
    # each in the other's place: told where it goes (a model was "not an embedding; it holds cond_stage_model...")
    ("--embedding", lambda tmp, models: models[1], "is a full model checkpoint, not an embedding; load it as the base "
     "model (--model) instead."),
    ("--embedding", lambda tmp, models: a_lora(tmp), "is a LoRA, not a textual-inversion embedding: it changes weights "
     "rather than adding a word, so draw with it by sample.py --lora"),
    ("--embedding", lambda tmp, models: a_lora(tmp, {"bias": torch.ones(1, 1, 1)}), "is not a textual-inversion "
     "embedding (one tensor of vectors (n, width), e.g. emb_params, or SDXL's clip_l and clip_g); it holds bias"),
    ("--lora", lambda tmp, models: models[1].parent, "is a folder, not a weights file; pass the file itself (it holds "),
    ("--embedding", lambda tmp, models: tmp, "is a folder, not a weights file; pass the file itself."),
])
def test_adapters_that_do_not_fit_are_one_sentence(models, tmp_path, capsys, flag, make, message):
    err = refusal(capsys, "--model", models[1], "--prompt", "x", flag, make(tmp_path, models), "--out", tmp_path / "out")
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_or_repeated_adapters_are_refused_before_the_model_loads(models, adapters, tmp_path, capsys,
                                                                         monkeypatch):
    """A missing LoRA was found after the model loaded (minutes for SDXL); one given twice was merged twice."""
    import minidb.load
    monkeypatch.setattr(minidb.load, "from_original", lambda *a, **k: pytest.fail("the model was loaded"))
    lora, word = adapters
    base = ["--model", models[1], "--prompt", "x", "--out", tmp_path / "out"]
    none = tmp_path / "none.safetensors"
    assert f"error: --lora {none} does not exist; check the path." in refusal(capsys, *base, "--lora", none)
    assert f"error: --embedding {none} does not exist" in refusal(capsys, *base, "--embedding", none)
    if Path("/dev/null").exists():
        assert "error: --lora /dev/null is not a regular file" in refusal(capsys, *base, "--lora", "/dev/null")
    again = tmp_path / "again.safetensors"
    again.symlink_to(lora)  # the same file under another name is the same LoRA
    err = refusal(capsys, *base, "--lora", lora, "--lora", f"{again}:0.5")
    assert f"error: --lora gives {again} twice (as {lora} and {again}); give it once, with the scale" in err
    err = refusal(capsys, *base, "--embedding", word, "--embedding", tmp_path / "x" / "ABZ.safetensors")
    assert "does not exist" in err  # a missing file first; then the same word twice:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ABZ.safetensors").write_bytes(word.read_bytes())
    err = refusal(capsys, *base, "--embedding", word, "--embedding", tmp_path / "x" / "ABZ.safetensors")
    assert "error: --embedding gives the word 'abz' twice" in err
    assert not (tmp_path / "out").exists()


def test_the_cpu_default_is_bf16_autocast_where_native_and_close_to_fp32(models, tmp_path):
    """Without --dtype, a CPU with native bf16 runs the denoising loop under bf16 autocast (recorded in the
    PNG) and the picture stays close to the exact fp32 one; elsewhere the default is the fp32 path."""
    from minidb.cli import cpu_bf16
    folder, _ = models
    pictures = {}
    for name, extra in (("default", []), ("fp32", ["--dtype", "fp32"])):
        args = ["--model", folder, "--prompt", "a photo of sks dog", "--steps", 3, "--seed", 7, "--height", 32,
                "--out", tmp_path / name, *extra]
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        (png,) = (tmp_path / name).glob("*.png")
        pictures[name] = (np.asarray(Image.open(png), dtype=np.float64), json.loads(Image.open(png).text["minidb"]))
    (default, about), (exact, _) = pictures["default"], pictures["fp32"]
    assert about["dtype"] == ("fp32+bf16-autocast" if cpu_bf16() else "fp32")
    assert about["vae_dtype"] == ("bf16 autocast" if cpu_bf16() else "float32")
    if cpu_bf16():
        assert 0 < np.abs(default - exact).mean() < 8  # bf16 keeps about 3 significant digits
    else:
        assert np.array_equal(default, exact)
