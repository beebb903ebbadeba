"""sample.py on SDXL as a user runs it: SDXL's own defaults (Euler with "leading" spacing, guidance 5.0,
the model's size), the picture diffusers' StableDiffusionXLPipeline draws with the same settings, the PNG
settings that record them, and the VAE's dtype (fp32 unless its config says it is safe in fp16)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import diffusers, diffusers_unet, diffusers_vae
from minidb.load import load
from test_samplers import SDXL_SCHEDULER_CONFIG
from test_sdxl import TINY_G, TINY_L, TINY_SDXL_UNET, reference_text
from test_sdxl_files import TINY_VAE, sdxl_pipeline

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks dog on the beach"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(a tiny SDXL StableDiffusionXLPipeline with SDXL's scheduler config, the folder it saved)."""
    tmp = tmp_path_factory.mktemp("sdxl-sample")
    pipe = sdxl_pipeline(tmp, diffusers_unet(TINY_SDXL_UNET), diffusers_vae(TINY_VAE), reference_text(TINY_L, seed=5),
                         reference_text(TINY_G, seed=6))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp / "sdxl")
    return pipe, tmp / "sdxl"


def sample(*args):
    args = [*args, *([] if "--dtype" in map(str, args) else ["--dtype", "fp32"])]  # the exact path
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_sdxl_defaults_draw_diffusers_picture(folder, tmp_path):
    pipe, path = folder
    size = load(path).resolution  # the model's own size, as SDXL's 1024
    r = sample("--model", path, "--prompt", PROMPT, "--steps", 4, "--seed", 7, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 euler steps, guidance 5" in r.stdout and "the VAE decodes in float32" in r.stdout
    image = Image.open(tmp_path / "00000-7.png")
    # diffusers with its own SDXL defaults: Euler from the scheduler config, no negative prompt (zeros),
    # micro-conditioning (H, W), (0, 0), (H, W); only the guidance (5.0, SDXL's recommended) is named
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=size, width=size, output_type="np",
               generator=torch.Generator("cpu").manual_seed(7)).images[0]
    diff = np.abs(np.asarray(image).astype(np.float64) - (ref * 255).round())
    assert image.size == (size, size) and diff.mean() < 0.1 and diff.max() <= 2
    # guards the comparison: another guidance gives another picture
    other = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=size, width=size, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(np.asarray(image).astype(np.float64) - (other * 255).round()).max() > 2

    assert image.text["parameters"] == (f"{PROMPT}\nNegative prompt: \nSteps: 4, Sampler: Euler, Schedule type: "
                                        "DDIM, CFG scale: 5, "
                                        f"Seed: 7, Size: {size}x{size}, Model: sdxl, RNG: CPU")
    settings = json.loads(image.text["minidb"])
    assert (settings["model_version"], settings["sampler"], settings["guidance"], settings["vae_dtype"]) == (
        "SDXL", "euler", 5.0, "float32")


def test_asked_settings_win_over_sdxl_defaults(folder, tmp_path):
    _, path = folder
    r = sample("--model", path, "--prompt", PROMPT, "--steps", 2, "--seed", 1, "--sampler", "ddim",
               "--guidance", 3, "--height", 24, "--width", 32, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "00000-1.png")
    settings = json.loads(image.text["minidb"])
    assert (settings["sampler"], settings["guidance"], image.size) == ("ddim", 3.0, (32, 24))
    assert "Sampler: DDIM" in image.text["parameters"] and "CFG scale: 3," in image.text["parameters"]


def test_vae_stays_fp32_unless_its_config_says_fp16_is_safe(folder, tmp_path):
    """SDXL's VAE overflows in fp16, so it decodes in fp32 (diffusers' force_upcast); a VAE made safe
    in fp16 (sdxl-vae-fp16-fix: force_upcast false) runs in the model's dtype. The choice is printed
    and recorded."""
    _, path = folder
    r = sample("--model", path, "--prompt", PROMPT, "--steps", 1, "--seed", 1, "--dtype", "bf16",
               "--height", 64, "--width", 64, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert json.loads(Image.open(tmp_path / "a" / "00000-1.png").text["minidb"])["vae_dtype"] == "float32"

    fixed = tmp_path / "fixed"
    subprocess.run(["cp", "-r", str(path), str(fixed)], check=True)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    assert config["force_upcast"] is True  # diffusers wrote it: the default
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    r = sample("--model", fixed, "--prompt", PROMPT, "--steps", 1, "--seed", 1, "--dtype", "bf16",
               "--height", 64, "--width", 64, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert "the VAE decodes in bfloat16 (its config says it is safe in fp16)" in r.stdout
    assert json.loads(Image.open(tmp_path / "b" / "00000-1.png").text["minidb"])["vae_dtype"] == "bfloat16"
    assert load(fixed).vae.cfg.force_upcast is False


def test_size_not_a_multiple_of_8_is_refused(folder, tmp_path):
    _, path = folder
    r = sample("--model", path, "--prompt", PROMPT, "--height", 1020, "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith("must be a multiple of 8 (the VAE works in 8x8 pixel "
                                                           "cells), not 1020.")
