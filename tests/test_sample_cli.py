"""sample.py as a user runs it: a subprocess on tiny models in a temporary folder (and, for the many
ways to get an argument wrong, its main() called in this process, which is quicker)."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from minidb.cli import SEED_MAX
from minidb.save import save_diffusers, save_single_file
from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny model as a diffusers folder and as a single file."""
    tmp = tmp_path_factory.mktemp("models")
    model = tiny_model()
    save_diffusers(model, tmp / "folder")
    save_single_file(model, tmp / "model.safetensors")
    return tmp / "folder", tmp / "model.safetensors"


def sample(*args, cwd=ROOT):
    """sample.py in a subprocess, on the exact fp32 path unless --dtype is given (the CPU's bf16 default
    has its own test)."""
    args = [*args, *([] if "--dtype" in map(str, args) or "--help" in args else ["--dtype", "fp32"])]
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def pixels(path):
    return Image.open(path).tobytes()


# ---- reading a PNG back: its raw text chunks, and A1111's grammar for "parameters" ----

def text_chunks(path):
    """[(chunk type, keyword, text)] for every tEXt, zTXt and iTXt chunk, read from the file's bytes."""
    data, pos, found = Path(path).read_bytes(), 8, []
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length  # length, type, body, CRC
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        key, rest = body.split(b"\0", 1)
        if kind == b"tEXt":
            value = rest.decode("latin-1")
        elif kind == b"zTXt":
            value = zlib.decompress(rest[1:]).decode("latin-1")
        else:  # compression flag, method, language tag \0, translated keyword \0, UTF-8 text
            compressed, (_, _, raw) = rest[0], rest[2:].split(b"\0", 2)
            value = (zlib.decompress(raw) if compressed else raw).decode("utf-8")
        found.append((kind.decode(), key.decode("latin-1"), value))
    return found


# modules/infotext_utils.py in AUTOMATIC1111's stable-diffusion-webui
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_a1111(text):
    """parse_generation_parameters, written from A1111's grammar: the last line holds the fields (read with
    RE_PARAM, a quoted value is JSON, "WxH" splits into key-1 and key-2), the lines before it the prompt,
    each stripped, and a line starting with "Negative prompt:" starts the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = RE_SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
        else:
            fields[key] = value
    return fields


def parse_comfyui(text):
    """The prompts ComfyUI takes from a dropped PNG's "parameters" (ComfyUI_frontend, src/scripts/pnginfo.ts
    importA1111): the text before the last "\nNegative prompt:" that comes before the last "\nSteps:", and the
    text between the two (18 characters on). Without either line it builds nothing: None."""
    steps = text.rfind("\nSteps:")
    negative = text.rfind("\nNegative prompt:", 0, steps) if steps > -1 else -1
    if negative == -1:
        return None
    return text[:negative].strip(), text[negative + 18:steps].strip()


def test_parser_reads_a1111s_own_example():
    """The grammar above, checked on the example in A1111's docstring, so that the tests below prove something."""
    text = ("girl with an artist's beret, determined, blue eyes\nNegative prompt: ugly, fat, (((deformed)))\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
            'Model: "a, b: c"')
    fields = parse_a1111(text)
    assert fields == {"Prompt": "girl with an artist's beret, determined, blue eyes",
                      "Negative prompt": "ugly, fat, (((deformed)))", "Steps": "20", "Sampler": "Euler a",
                      "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512",
                      "Model hash": "45dee52b", "Model": "a, b: c"}



def test_hash_fields_hold_names_as_a1111_writes_them():
    """A1111 writes "Lora hashes" and "TI hashes" as "name: hash, ..." with ":" and "," taken out of each name
    (extra_networks_lora.py, sd_hijack_clip.py), and on paste splits the field at "," and each item at ":"
    (lora_script.py). A LoRA file named "v2: ink, wash" must not split into extra items."""
    from minidb.pnginfo import hashes, parameters
    field = hashes([("v2: ink, wash", "0123456789ab"), ("plain", "ba9876543210")])
    assert field == "v2 ink wash: 0123456789ab, plain: ba9876543210"
    assert [item.split(":") for item in field.split(",")] == [["v2 ink wash", " 0123456789ab"],
                                                             [" plain", " ba9876543210"]]
    text = parameters("a cup", None, {"Steps": 3, "Sampler": "Euler", "Seed": 1, "Lora hashes": field})
    assert parse_a1111(text)["Lora hashes"] == field
    assert hashes([]) is None  # no LoRA: no field


def test_a_lora_scale_that_is_no_number_is_named(tmp_path):
    """--lora PATH:SCALE, with a file at PATH and a SCALE that is no number: the scale is named, rather than
    the whole text called a path that does not exist. A colon inside a path (no file before it) stays a path."""
    import argparse
    from minidb.cli import path_and_scale
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    assert path_and_scale(f"{lora}:0.5") == (str(lora), 0.5) and path_and_scale(str(lora)) == (str(lora), 1.0)
    with pytest.raises(argparse.ArgumentTypeError) as e:
        path_and_scale(f"{lora}:abc")
    assert str(e.value) == f"the scale after {lora}: must be a number from -10 to 10, such as {lora}:0.8, not 'abc'"
    assert path_and_scale(str(tmp_path / "C:x.safetensors")) == (str(tmp_path / "C:x.safetensors"), 1.0)

# ---- what a run writes ----

def test_writes_images_grid_and_a1111_metadata(models, tmp_path):
    folder, single = models
    out = tmp_path / "out"
    r = sample("--model", folder, "--prompt", "a photo of sks dog", "--negative-prompt", "blurry", "--n", "2",
               "--steps", "3", "--seed", "42", "--height", "32", "--width", "48", "--out", out)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-42.png", "00001-43.png", "grid-00000-42.png"]  # each image named by its own seed
    for name in files[:2]:
        assert f"wrote {out / name}" in r.stdout
    image = Image.open(out / "00001-43.png")
    assert image.size == (48, 32)
    assert image.text["parameters"] == ("a photo of sks dog\nNegative prompt: blurry\n"
                                        "Steps: 3, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, "
                                        "Seed: 43, Size: 48x32, Model: folder, RNG: CPU")  # a folder has no hash
    settings = json.loads(image.text["minidb"])
    assert settings.pop("device") in ("cpu", "cuda") and settings.pop("dtype") in ("fp32", "fp16")
    assert settings.pop("vae_dtype") == "float32"  # SD's VAE decodes in fp32 (force_upcast)
    assert settings == {"prompt": "a photo of sks dog", "negative_prompt": "blurry", "seed": 43, "steps": 3,
                        "guidance": 7.5, "sampler": "ddim", "width": 48, "height": 32, "model": "folder",
                        "model_version": "SD 1.x", "prediction_type": "epsilon", "loras": [], "embeddings": []}
    assert Image.open(out / "grid-00000-42.png").size == (96, 32)  # 2 images side by side

    # the single file gives the very same pixels, and numbering continues instead of overwriting
    r = sample("--model", single, "--prompt", "a photo of sks dog", "--negative-prompt", "blurry", "--n", "2",
               "--steps", "3", "--seed", "42", "--height", "32", "--width", "48", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "00002-42.png").is_file() and (out / "00003-43.png").is_file()
    assert pixels(out / "00000-42.png") == pixels(out / "00002-42.png")
    short_sha256 = hashlib.sha256(single.read_bytes()).hexdigest()[:10]  # what A1111 shows as "Model hash"
    assert f"Model hash: {short_sha256}, Model: model, " in Image.open(out / "00003-43.png").text["parameters"]


def test_each_image_redraws_alone_from_its_recorded_seed(models, tmp_path):
    """Image i of a run is the image that seed + i draws on its own. Euler a draws noise at every step too."""
    folder, _ = models
    common = ["--model", folder, "--prompt", "a dog", "--steps", "3", "--height", "32", "--sampler", "euler-a"]
    r = sample(*common, "--n", "3", "--seed", "7", "--out", tmp_path / "batch")
    assert r.returncode == 0, r.stderr
    third = tmp_path / "batch" / "00002-9.png"
    seed = parse_a1111(Image.open(third).text["parameters"])["Seed"]
    assert seed == "9"
    r = sample(*common, "--n", "1", "--seed", seed, "--out", tmp_path / "alone")
    assert r.returncode == 0, r.stderr
    assert pixels(tmp_path / "alone" / "00000-9.png") == pixels(third)
    assert pixels(tmp_path / "batch" / "00000-7.png") != pixels(third)


ROUND_TRIPS = {  # prompt, negative prompt, sampler, model: A1111's quoting and both kinds of text chunk
    "latin-1": ('a "quoted" dog, on a beach: at sunset, (sks:1.2) \\ 50% café\nsecond line, with: colons',
                "blurry, low quality\nugly: yes", "ddpm", "folder"),
    "not latin-1": ("一只狗, 在海滩上 🙂", "", "dpmpp-2m", "single file"),
}


@pytest.fixture(scope="module")
def drawn(models, tmp_path_factory):
    """One PNG for each of ROUND_TRIPS, with the model under a name A1111 has to quote."""
    folder, single = models
    tmp = tmp_path_factory.mktemp("drawn")
    shutil.copytree(folder, tmp / "my, model: v1")
    shutil.copy(single, tmp / "my, model: v1.safetensors")
    paths = {}
    for name, (prompt, negative, sampler, kind) in ROUND_TRIPS.items():
        model = tmp / ("my, model: v1" if kind == "folder" else "my, model: v1.safetensors")
        out = tmp / name
        r = sample("--model", model, "--prompt", prompt, "--negative-prompt", negative, "--sampler", sampler,
                   "--steps", "2", "--height", "32", "--guidance", "5", "--seed", "3", "--out", out)
        assert r.returncode == 0, r.stderr
        paths[name] = out / "00000-3.png"
    return tmp, paths


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_parameters_read_back_with_a1111s_grammar(drawn, name):
    _, paths = drawn
    prompt, negative, sampler, kind = ROUND_TRIPS[name]
    text = Image.open(paths[name]).text["parameters"]
    fields = parse_a1111(text)
    assert fields.pop("Prompt") == prompt and fields.pop("Negative prompt") == negative
    assert parse_comfyui(text) == (prompt, negative)  # ComfyUI too, even with no negative prompt (it built nothing)
    expected = {"Steps": "2", "CFG scale": "5", "Seed": "3", "Size-1": "32", "Size-2": "32",
                "Model": "my, model: v1", "RNG": "CPU",
                **({"Sampler": "DDIM", "Schedule type": "Automatic", "Eta DDIM": "1"} if sampler == "ddpm" else
                   {"Sampler": "DPM++ 2M", "Schedule type": "SGM Uniform"})}
    if kind == "single file":
        assert re.fullmatch("[0-9a-f]{10}", fields.pop("Model hash"))
    assert fields == expected


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_png_holds_only_parameters_and_minidb_and_no_paths(drawn, name):
    """ComfyUI reads a chunk named "prompt" as its own workflow; A1111 writes tEXt, or iTXt beyond Latin-1."""
    tmp, paths = drawn
    chunks = text_chunks(paths[name])
    assert [key for _, key, _ in chunks] == ["parameters", "minidb"]
    kind = {key: kind for kind, key, _ in chunks}
    prompt = ROUND_TRIPS[name][0]
    assert kind["parameters"] == ("tEXt" if name == "latin-1" else "iTXt") and kind["minidb"] == "tEXt"
    for _, _, value in chunks:
        assert str(tmp) not in value and str(ROOT) not in value and str(Path.home()) + "/" not in value
    settings = json.loads(dict((key, value) for _, key, value in chunks)["minidb"])
    assert settings["model"] in ("my, model: v1", "my, model: v1.safetensors") and settings["prompt"] == prompt


# ---- bad input: one sentence, exit code 2, nothing written ----

def main_of_sample():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def refusal(capsys, *args):
    """sample.py's main run in this process (a refusal needs no interpreter of its own) -> its stderr,
    after checking that it exits with code 2 without a traceback."""
    with pytest.raises(SystemExit) as e:
        main_of_sample()([*map(str, args), "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args,message", [
    (["--height", "30"], "error: --height must be a multiple of 8"),
    (["--width", "0"], "argument --width: must be between 8 and 8192, not 0"),
    (["--height", "16384"], "argument --height: must be between 8 and 8192"),
    (["--steps", "0"], "argument --steps: must be between 1 and 999"),
    (["--steps", "1000"], "argument --steps: must be between 1 and 999"),
    (["--n", "0"], "argument --n: must be between 1 and 1000"),
    (["--n", "100000"], "argument --n: must be between 1 and 1000"),
    (["--n", "2.5"], "argument --n: '2.5' is not a whole number"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number, not nan"),
    (["--guidance=-inf"], "argument --guidance: must be a finite number"),
    (["--guidance", "-3"], "argument --guidance: must be between 1 and 30, not -3"),
    (["--guidance", "0.5"], "argument --guidance: must be between 1 and 30"),
    (["--guidance", "1e30"], "argument --guidance: must be between 1 and 30"),
    (["--seed", str(2**64)], f"argument --seed: must be between -1 and {SEED_MAX}"),
    (["--seed", "-2"], f"argument --seed: must be between -1 and {SEED_MAX}"),  # (-1: random, as in A1111)
    (["--seed", str(SEED_MAX), "--n", "2"], "error: --seed plus --n must stay within the largest seed"),
    (["--prompt", ""], "argument --prompt: must not be empty"),
    (["--out", ""], "argument --out: must not be empty; give a path"),  # it wrote into the current folder
    (["--model", ""], "argument --model: must not be empty; give a path"),  # it meant the default model
    (["--lora", ""], "argument --lora: must not be empty; give a path"),  # it was read as the current folder
    (["--lora", " "], "argument --lora: must not be empty; give a path"),
    (["--embedding", ""], "argument --embedding: must not be empty; give a path"),
    (["--out", "pictures/" + "p" * 300], "argument --out: has a name of 300 bytes"),  # an OSError once it had drawn
    (["--prompt", " \t\n"], "argument --prompt: must not be empty"),
    (["--negative-prompt", "\udcff\udcfe"], "argument --negative-prompt: is not valid UTF-8"),
    (["--sampler", "plms"], "invalid choice: 'plms'"),
    # A1111's LoRA tag went to CLIP as letters, and into the PNG as if the LoRA had been applied
    (["--prompt", "a cat <lora:style:0.8>"], "error: --prompt holds <lora:style:0.8>, AUTOMATIC1111's tag for a "
     "LoRA, which sample.py does not read; give the file as --lora PATH:WEIGHT instead (e.g. --lora "
     "style.safetensors:0.8)."),
    (["--negative-prompt", "<LyCO:bad:1>"], "error: --negative-prompt holds <LyCO:bad:1>, AUTOMATIC1111's tag"),
    (["--prompt", "a cat <lora:style:1>", "--lora", "loras/style.safetensors"],  # a PNG's prompt, minidb's own too
     "error: --prompt holds <lora:style:1>, AUTOMATIC1111's tag for a LoRA, which sample.py does not read; remove "
     "it: --lora already applies that file."),
    (["--device", "tpu"], "error: --device 'tpu' is not a device name"),
    (["--device", "mps"], "error: --device mps is not supported"),
    (["--device", "cpu", "--dtype", "fp16"], "error: --dtype fp16 is not supported on the CPU"),
    (["--model", "/no/such/model.safetensors"], "error: No model at /no/such/model.safetensors"),
])
def test_bad_arguments_fail_clearly_and_write_nothing(models, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[0]), "--prompt", "x", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_seed_minus_one_is_a_random_seed_as_in_a1111(models, tmp_path):
    """A1111's users write --seed -1 for a random seed; it was refused as out of range."""
    r = sample("--model", models[0], "--prompt", "x", "--seed", "-1", "--steps", "1", "--height", "32",
               "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    seed = int(parse_a1111(Image.open(next(tmp_path.glob("*.png"))).text["parameters"])["Seed"])
    assert 0 <= seed < 2**32 and f"seed {seed}" in r.stdout


def test_no_cuda_is_one_sentence(models, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[0]), "--prompt", "x", "--out", str(tmp_path), "--device", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --device cuda was asked for, but PyTorch sees no CUDA GPU" in err


@pytest.mark.parametrize("args,message", [
    (["--prompt", b"\xff\xfe a dog"], "argument --prompt: is not valid UTF-8 text"),  # raw bytes in argv
    (["--guidance", "nan"], "argument --guidance: must be a finite number, not nan"),
])
def test_bad_arguments_as_a_user_sees_them(models, tmp_path, args, message):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(models[0]), "--prompt", "x",
                        "--out", str(out), *args], cwd=ROOT, capture_output=True, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_out_that_is_a_file(models, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        assert "cannot be a folder" in refusal(capsys, "--model", models[0], "--prompt", "x", "--out", out)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_out_through_a_link_to_nothing_names_the_link(models, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    err = refusal(capsys, "--model", models[0], "--prompt", "x", "--out", tmp_path / "link")
    assert f"({tmp_path / 'link'} is a link to {tmp_path / 'gone'}, which does not exist)" in err


def test_out_named_like_a_picture_is_refused_unless_such_a_folder_exists(models, tmp_path, capsys):
    """--out cat.png would have made a folder called cat.png: one sentence says --out is a folder and
    offers one. A folder that really has such a name is used as it is."""
    err = refusal(capsys, "--model", models[1], "--prompt", "x", "--out", tmp_path / "cat.png")
    assert (f"--out {tmp_path / 'cat.png'} looks like a picture's name, but --out is the folder the pictures go "
            f"into (each named by its number and seed); pass a folder, such as --out {tmp_path / 'cat'}.") in err
    assert not (tmp_path / "cat.png").exists()
    (tmp_path / "shots.png").mkdir()
    r = sample("--model", models[1], "--prompt", "x", "--steps", 2, "--height", 32, "--out", tmp_path / "shots.png")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "shots.png").glob("*.png"))) == 1


def test_model_that_fails_to_load(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    err = refusal(capsys, "--model", tmp_path / "broken.safetensors", "--prompt", "x", "--out", tmp_path / "out")
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="the memory check reads Linux's /proc/meminfo")
def test_far_too_large_is_refused_before_drawing(models, tmp_path, capsys):
    """The tiny model's VAE attention alone would hold two (L, L) float32 matrices, L = 4096^2: petabytes."""
    t0 = time.time()
    err = refusal(capsys, "--model", models[0], "--prompt", "x", "--device", "cpu", "--height", "8192", "--width",
                  "8192", "--out", tmp_path / "out")
    assert re.search(r"error: drawing 1 image of 8192x8192 needs about [\d,.]+ GB of memory beyond the model's "
                     r"weights \(a rough estimate\), but this machine has [\d,.]+ GB available", err)
    assert time.time() - t0 < 120 and not (tmp_path / "out").exists()


def test_ctrl_c_while_drawing_is_one_sentence(models, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--model", str(models[1]), "--prompt", "x",
                          "--steps", "999", "--height", "128", "--out", str(out)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = p.stdout.readline()
    assert line.startswith("loaded "), line + p.stderr.read()  # the model is loaded and drawing begins
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and stderr.strip().endswith("interrupted.") and "Traceback" not in stderr, stderr
    assert not out.exists() or not any(out.iterdir())  # no image was finished, and no temporary file is left


def test_long_prompt_warns_then_runs(models, tmp_path):
    folder, _ = models
    r = sample("--model", folder, "--prompt", "a very " * 60 + "good dog", "--steps", "2", "--height", "32",
               "--out", tmp_path, "--sampler", "euler-a")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr and "dropped its last" in r.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_a_negative_prompt_without_guidance_is_warned_of(models, tmp_path):
    """At --guidance 1 the negative prompt is never read: the picture was the same, and the PNG recorded it, unsaid."""
    common = ["--model", models[1], "--prompt", "a dog", "--steps", "2", "--height", "32", "--guidance", "1", "--seed", "3"]
    r = sample(*common, "--negative-prompt", "blurry", "--out", tmp_path / "neg")
    assert r.returncode == 0, r.stderr
    assert "warning: --negative-prompt does nothing at --guidance 1, which draws without guidance (the picture is the " \
           "same without it); raise --guidance to use it." in r.stderr
    plain = sample(*common, "--out", tmp_path / "plain")
    assert plain.returncode == 0 and "negative" not in plain.stderr, plain.stderr
    (a,), (b,) = (list((tmp_path / name).glob("*.png")) for name in ("neg", "plain"))
    assert pixels(a) == pixels(b)  # what the warning says


def test_the_docs_placeholder_in_a_prompt_is_warned_of_then_drawn(models, tmp_path):
    """[V] copied from the docs is read as the letters [V]: a warning names what to write instead."""
    r = sample("--model", models[1], "--prompt", "a photo of a [V] dog", "--steps", "2", "--height", "32",
               "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: The prompt holds [V], which the model reads as those letters; write the identifier" in r.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1
    r = sample("--model", models[1], "--prompt", "a photo of a sks dog", "--steps", "2", "--height", "32",
               "--out", tmp_path / "plain")
    assert r.returncode == 0 and "[V]" not in r.stderr, r.stderr


def test_the_placeholder_is_read_as_the_identifier_the_files_record(tmp_path):
    """A model (or LoRA) that train.py exported records its identifier: [V] in a prompt is read as it when
    the files record one, and warned of, naming them, when they record two."""
    from minidb.lora import LoRA, save_kohya
    run = lambda identifier: json.dumps({"identifier": identifier, "class": "dog", "method": "full"})  # noqa: E731
    save_single_file(tiny_model(), tmp_path / "model.safetensors", metadata={"minidb_run": run("zwx")})
    r = sample("--model", tmp_path / "model.safetensors", "--prompt", "a photo of a [V] dog", "--steps", "2",
               "--height", "32", "--out", tmp_path / "one")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "[V] in the prompt is read as zwx" in r.stdout
    (png,) = (tmp_path / "one").glob("*.png")
    assert json.loads(dict((key, value) for _, key, value in text_chunks(png))["minidb"])["prompt"] == "a photo of a zwx dog"
    # a prompt copied from elsewhere names another word: drawn, with a note of the word that would draw the subject
    r = sample("--model", tmp_path / "model.safetensors", "--prompt", "a photo of sks dog", "--steps", "2",
               "--height", "32", "--out", tmp_path / "sks")
    assert r.returncode == 0 and ("note: the prompt names no subject these files were trained on (zwx), so it draws "
                                  "without one; write [V] or zwx where the subject goes.") in r.stdout, r.stdout
    r = sample("--model", tmp_path / "model.safetensors", "--prompt", "a photo of ZWX dog", "--steps", "2",
               "--height", "32", "--out", tmp_path / "named")
    assert r.returncode == 0 and "note:" not in r.stdout and "[V]" not in r.stdout
    # an embedding's word is its file's name, whatever it records: no note sends the user to the recorded one
    safetensors.torch.save_file({"emb_params": torch.ones(1, 32)}, tmp_path / "mydog.safetensors",
                                metadata={"minidb": run("sks")})
    r = sample("--model", tmp_path / "model.safetensors", "--embedding", tmp_path / "mydog.safetensors", "--prompt",
               "a photo of mydog dog", "--steps", "2", "--height", "32", "--out", tmp_path / "renamed")
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout

    save_kohya(LoRA(tiny_model(), rank=2), tmp_path / "lora.safetensors", metadata={"minidb": run("qpv")})
    r = sample("--model", tmp_path / "model.safetensors", "--lora", tmp_path / "lora.safetensors", "--prompt",
               "a photo of a [V] dog", "--steps", "2", "--height", "32", "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr
    assert "warning: The prompt holds [V]" in r.stderr and "these files record zwx, qpv" in r.stderr
    (png,) = (tmp_path / "two").glob("*.png")
    assert json.loads(dict((key, value) for _, key, value in text_chunks(png))["minidb"])["prompt"] == "a photo of a [V] dog"


def test_help_says_what_each_sampler_is_and_the_default_size(capsys):
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and "default: the model's own training size" in help_text
    assert "[--model MODEL] --prompt PROMPT [--long-prompts]" in help_text  # required, though checked after parsing
    for line in ("ddim DDIM with eta 0: deterministic", "ddpm DDPM", "euler Euler: deterministic",
                 "euler-a Euler ancestral", "dpmpp-2m DPM-Solver++ 2M"):
        assert line in help_text


def test_missing_sd_weights_say_how_to_get_them(tmp_path):
    from minidb.fetch import DEFAULT_MODEL
    if Path(DEFAULT_MODEL).exists():
        pytest.skip("this clone has the SD 1.5 weights")
    r = sample("--model", DEFAULT_MODEL, "--prompt", "x", "--out", tmp_path)
    assert r.returncode == 2 and "python -m minidb.fetch" in r.stderr


def test_a_full_disk_keeps_the_images_written_so_far(models, tmp_path, capsys, monkeypatch):
    import errno
    import sample
    from PIL import Image as PILImage
    real, saved = PILImage.Image.save, []

    def save(self, fp, *args, **kwargs):
        if saved:  # the second PNG finds the disk full, half written
            Path(fp).write_bytes(b"half a png")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", save)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", str(models[0]), "--prompt", "x", "--n", "2", "--steps", "1", "--height", "32",
                     "--seed", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"The disk holding {out} is full: the next image needs about" in err
    assert sorted(p.name for p in out.iterdir()) == ["00000-5.png"]  # the first image kept, no half file


# ---- an --out that cannot be made, a PNG that cannot be written, a picture that is not finite ----

@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux's /proc, where no folder can be made")
def test_out_that_cannot_be_made_is_refused_before_drawing(models, capsys):
    """/proc passes a writability check (for root), but no folder can be made in it."""
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[0]), "--prompt", "x", "--out", "/proc/minidb-test"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: Cannot write to --out /proc/minidb-test (" in err and "Traceback" not in err


def test_the_out_check_leaves_no_folder_behind_when_the_run_fails(models, tmp_path, capsys):
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(0, 32)}, tmp_path / "abz.safetensors")
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[1]), "--prompt", "x", "--embedding", str(tmp_path / "abz.safetensors"),
                          "--out", str(out)])
    assert e.value.code == 2 and "holds no vectors (emb_params has the shape (0, 32))" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_png_that_cannot_be_written_is_one_sentence(models, tmp_path, capsys, monkeypatch):
    import errno
    from PIL import Image as PILImage

    def save(self, fp, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(PILImage.Image, "save", save)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[0]), "--prompt", "x", "--steps", "1", "--height", "32", "--seed", "5",
                          "--dtype", "fp32", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"error: Cannot write {out / '00000-5.png'} (Permission denied); choose another --out." in err
    assert list(out.iterdir()) == []  # no temporary file left


def test_a_picture_that_comes_out_not_finite_is_not_saved(models, tmp_path, capsys):
    """Vectors of 1e38 are finite, so the embedding is read, but they overflow the text encoder: NaN latents,
    which would be a black PNG."""
    from safetensors.torch import save_file
    save_file({"emb_params": torch.full((1, 32), 1e38)}, tmp_path / "zqb.safetensors")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(models[1]), "--prompt", "a photo of zqb", "--embedding",
                          str(tmp_path / "zqb.safetensors"), "--steps", "1", "--height", "32", "--dtype", "fp32",
                          "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert (f"error: The picture came out as NaN or infinite numbers, so it was not saved: {models[1]} or "
            f"{tmp_path / 'zqb.safetensors'} likely hold broken weights (NaN, or numbers far too large); use other "
            "files.") in err
    assert not out.exists()


def test_a_vae_that_decodes_nan_saves_no_picture(models, tmp_path, capsys):
    """Finite latents, but a VAE decoder with a NaN weight: the decoded picture is NaN, which would be a black
    PNG; it is refused with the same sentence."""
    import shutil
    from minidb.files import read_tensors
    from minidb.writes import write_safetensors
    shutil.copytree(models[0], tmp_path / "model")
    vae = tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = read_tensors(vae)[0]
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] * float("nan")
    write_safetensors(vae, tensors)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--model", str(tmp_path / "model"), "--prompt", "a ball", "--steps", "1", "--height", "32",
                          "--dtype", "fp32", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"error: The picture came out as NaN or infinite numbers, so it was not saved: {tmp_path / 'model'}" in err
    assert not out.exists()


def test_a_picture_not_finite_in_fp16_suggests_fp32():
    import types
    import sample
    args = types.SimpleNamespace(model="m.safetensors", lora=[], embedding=[])
    sentence = sample.not_finite(args, "fp16")
    assert "fp16 likely overflowed, so draw again with --dtype fp32" in sentence
    assert "m.safetensors likely holds" in sentence
    assert "\n" not in sentence and sentence.endswith(".")


def test_a_misspelt_flag_is_named(capsys):
    """`--promt "a cup"` said only that --prompt is required: argparse checks required flags before unknown ones."""
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--promt", "a cup"])
    assert e.value.code == 2 and "error: unrecognized arguments: --promt a cup" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_of_sample()(["--steps", "3"])
    assert e.value.code == 2 and "error: the following arguments are required: --prompt" in capsys.readouterr().err


def test_bf16_asked_for_on_a_cpu_without_it_is_warned_of(models, tmp_path, monkeypatch):
    """--dtype bf16 (sample.py) or --mixed-precision bf16 (train.py) on a CPU that emulates bf16 ran many times
    slower than fp32, silently; the default stays fp32 there, and a CPU with bf16 arithmetic is not warned of."""
    from minidb import cli
    monkeypatch.setattr(cli, "cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"^--dtype bf16 on this CPU, which has no bf16 arithmetic \(AVX512-BF16 or "
                                         r"AMX\), is emulated and many times slower than fp32 .*; leave --dtype out to "
                                         r"run in fp32\.$"):
        main_of_sample()(["--model", str(models[0]), "--prompt", "a cup", "--dtype", "bf16", "--device", "cpu",
                          "--steps", "1", "--height", "32", "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # warned, not refused
    with pytest.warns(UserWarning, match=r"^--mixed-precision bf16 on this CPU"):
        cli.warn_if_bf16_is_emulated(torch.device("cpu"), "bf16", "--mixed-precision")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device, asked in (("cpu", None), ("cpu", "fp32"), ("cuda", "bf16")):
            cli.warn_if_bf16_is_emulated(device, asked, "--dtype")
        monkeypatch.setattr(cli, "cpu_bf16", lambda: True)
        cli.warn_if_bf16_is_emulated("cpu", "bf16", "--dtype")
