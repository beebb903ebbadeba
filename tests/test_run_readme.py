"""The lines a full run's README gives other tools (minidb/export.py how_to_use), run as a user copies them:
a half-precision export draws in diffusers what the fp32 model draws, the single file, read with its folder
as the config, gives the folder's model and prediction type, and a Windows path stays itself. The helpers
here run the lines for test_methods.py, test_sdxl_files.py and test_sdxl_train.py too."""

import ast
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import diffusers
from minidb.export import how_to_use
from minidb.load import load
from minidb.save import save_diffusers, save_single_file
from test_load_save import load_pipe, reference_pipeline


def readme_calls(text):
    """The diffusers calls in a full run's README text: {"from_pretrained": code, "from_single_file": code}."""
    calls = re.findall(r"`pipe = (\w+Pipeline\.(from_pretrained|from_single_file)\(.*?\))`", text)
    return {name: code for code, name in calls}


def readme_code(model, out, dtype):
    """readme_calls of the line minidb/export.py writes for a full run whose model was saved into `out` in `dtype`."""
    args = types.SimpleNamespace(method="full", model="base")
    subject = types.SimpleNamespace(identifier="sks", new_scene="a photo of sks dog on the beach")
    _, (line,) = how_to_use(args, out, model, [subject], dtype=dtype)
    return readme_calls(line)


def as_the_readme_says(code):
    """Run one line of a run's README as a user runs it, with torch and the pipeline classes imported."""
    return eval(code, {"torch": torch, "StableDiffusionPipeline": diffusers.StableDiffusionPipeline,
                       "StableDiffusionXLPipeline": diffusers.StableDiffusionXLPipeline})


def draw(pipe, seed=5):
    """A diffusers picture in 8-bit levels (0..255), in two steps: every part runs, and fp16 is slow on a CPU."""
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed)).images[0].astype(np.float64) * 255


def parts_of(pipe):
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])


def assert_same_weights(a, b):
    for name in parts_of(b):
        ours, ref = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name


def assert_half_as_the_readme_says(calls, dtype, reference, another):
    """Both README lines give the model in `dtype`, and it draws the fp32 `reference` picture up to rounding.
    Its weights are rounded to the dtype and it computes in it: the mean error stays within two of the dtype's
    rounding steps (finfo.eps: 2^-10 for fp16, 2^-7 for bf16) of the 0..255 range (measured: under one step),
    while the picture from another seed (`another`) is tens of levels away. Without torch_dtype drawing fails
    ("mat1 and mat2 must have the same dtype": diffusers makes the UNet fp32, transformers keeps the text encoder
    in the file's dtype), as the README line says."""
    half = as_the_readme_says(calls["from_pretrained"])
    assert {name: getattr(half, name).dtype for name in parts_of(half)} == dict.fromkeys(parts_of(half), dtype)
    bound = 2 * 255 * torch.finfo(dtype).eps
    error = np.abs(draw(half) - reference).mean()
    assert error < bound, error
    assert np.abs(another - reference).mean() > 5 * bound  # a bound that tells pictures apart
    assert_same_weights(as_the_readme_says(calls["from_single_file"]), half)  # so it draws the same
    # why the line names torch_dtype: without it, drawing fails (with these diffusers and transformers pins)
    without = as_the_readme_says(calls["from_pretrained"].replace(f", torch_dtype={dtype}", ""))
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        draw(without)


@pytest.fixture(scope="module")
def fp32_sd1(tmp_path_factory):
    """(minidb's SD 1.x model, the reference pipeline's fp32 picture, and its picture from another seed)."""
    tmp = tmp_path_factory.mktemp("fp32")
    pipe = reference_pipeline("SD 1.x", tmp)
    return load_pipe(pipe, tmp), draw(pipe), draw(pipe, seed=6)


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")  # 0.42 prefers dtype=, which older ones ignore
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_export_draws_in_diffusers_as_the_run_readme_says(fp32_sd1, tmp_path, dtype):
    model, reference, another = fp32_sd1
    save_diffusers(model, tmp_path / "run" / "model", dtype=dtype)  # as train.py exports a half base, or --save-dtype
    save_single_file(model, tmp_path / "run" / "model.safetensors", dtype=dtype)
    calls = readme_code(model, tmp_path / "run", dtype)
    assert calls["from_pretrained"] == (f'StableDiffusionPipeline.from_pretrained("{tmp_path / "run" / "model"}", '
                                        f'torch_dtype={dtype})')
    assert_half_as_the_readme_says(calls, dtype, reference, another)


@pytest.mark.parametrize("family,prediction", [("SD 1.x", "epsilon"), ("SD 2.x", "v_prediction"),
                                               ("SD 2.x", "epsilon")])
def test_the_single_file_opens_in_diffusers_with_its_folder_as_the_config(tmp_path, family, prediction):
    """Without config, diffusers would take an SD 2 file for 2.1's 768 v-prediction model (single_file_utils.py,
    "v2") whatever it is, and would need the Hub for the config."""
    reference_pipeline(family, tmp_path).save_pretrained(tmp_path / "base")
    model = load(tmp_path / "base", prediction_type=prediction)  # the 512 base models of SD 2 predict epsilon
    save_diffusers(model, tmp_path / "run" / "model")
    folder = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():  # the file differs from the folder here, so equal weights come from the file
        model.unet.out[2].bias.add_(1.0)
    save_single_file(model, tmp_path / "run" / "model.safetensors")
    again = as_the_readme_says(readme_code(model, tmp_path / "run", torch.float32)["from_single_file"])
    assert again.scheduler.config.prediction_type == prediction and isinstance(again.scheduler, diffusers.DDIMScheduler)
    unet_config = lambda pipe: {k: v for k, v in pipe.unet.config.items() if k != "_name_or_path"}  # noqa: E731
    assert unet_config(again) == unet_config(folder) and again.unet.config.upcast_attention is (family == "SD 2.x")
    with torch.no_grad():
        folder.unet.conv_out.bias.add_(1.0)
    assert_same_weights(again, folder)


def test_the_readme_lines_write_a_windows_path_as_python_reads_it():
    """A path goes into the lines as a Python string with its backslashes doubled: written as it was, in
    "D:\\work\\runs" Python read \\r as a carriage return, and "C:\\Users" was a SyntaxError."""
    out = Path(r"D:\work\runs\dreambooth-1")
    subject = types.SimpleNamespace(identifier="sks", new_scene="a photo of sks dog on the beach")
    full, lora = (types.SimpleNamespace(method=method, model="base") for method in ("full", "lora"))
    for version in ("SD 1.x", "SDXL"):
        model = types.SimpleNamespace(version=version)
        lines = [*how_to_use(full, out, model, [subject], dtype=torch.float16)[1],
                 *how_to_use(lora, out, model, [subject], lora_file=out / "lora.safetensors",
                             word_file=out / "sks.safetensors")[1]]
        calls = [node for line in lines for code in re.findall(r"`([^`]*\(.*?\))`", line)
                 for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
        paths = {node.value for call in calls for node in [*call.args, *(k.value for k in call.keywords)]
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\\" in node.value}
        assert paths == {str(out / "model"), str(out / "model.safetensors"), str(out), str(out / "sks.safetensors")}
