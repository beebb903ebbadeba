"""Weights in and out, checked against diffusers' own writers and readers.

- A diffusers folder written by diffusers' save_pretrained (fp32, fp16 variant, .bin) loads in minidb
  with identical weights and outputs.
- minidb's single-file export, converted back by diffusers' single-file conversion functions, gives
  exactly the diffusers model it came from; minidb's diffusers export opens in diffusers.
- An SD 2 single file with OpenCLIP keys loads correctly. (Files that minidb did not write, such as
  a Lightning .ckpt, are tested in test_foreign_files.py.)
- The diffusers lines a full run's README gives (minidb/export.py) are run as written: a half-precision
  export draws in diffusers what the fp32 model draws, and the single file, read with its folder as the
  config, gives the folder's model and prediction type.
"""

import ast
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_TEXT, assert_close, TINY_UNET, diffusers, diffusers_unet, diffusers_vae, transformers, transformers_text_encoder
from minidb import vae as va
from minidb.export import how_to_use
from minidb.load import load
from minidb.save import save_diffusers, save_single_file
from minidb.tokenizer import Tokenizer
from diffusers.loaders import single_file_utils as sfu

FAMILIES = ["SD 1.x", "SD 2.x"]
PRED = {"SD 1.x": "epsilon", "SD 2.x": "v_prediction"}


def reference_pipeline(family, tmp_path):
    """A tiny StableDiffusionPipeline with random weights, built by diffusers and transformers."""
    tok_dir = tmp_path / "tok"
    Tokenizer.for_version(family).save(tok_dir)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=PRED[family])
    return diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(va.TINY), text_encoder=transformers_text_encoder(TINY_TEXT[family]),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir), unet=diffusers_unet(TINY_UNET[family]),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, reference pipeline, folder that diffusers' save_pretrained wrote)."""
    tmp = tmp_path_factory.mktemp(request.param.replace(" ", "").replace(".", ""))
    pipe = reference_pipeline(request.param, tmp)
    pipe.save_pretrained(tmp / "diffusers")
    return request.param, pipe, tmp / "diffusers"


def assert_same_outputs(model, pipe):
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of sks dog", "wow! a cat"]
    ids = model.tokenizer(prompts)
    ref_ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 800])
    with torch.no_grad():
        ctx = model.text_encoder(ids)
        assert torch.equal(ctx, pipe.text_encoder(ids).last_hidden_state)
        assert torch.equal(model.unet(x, t, ctx), pipe.unet(x, t, ctx).sample)
        assert_close(model.vae.decode(x), pipe.vae.decode(x).sample)


def test_diffusers_folder_loads_with_identical_outputs(saved):
    family, pipe, folder = saved
    model = load(folder)
    assert (model.version, model.prediction_type) == (family, PRED[family])
    assert model.tokenizer.pad_id == {"SD 1.x": 49407, "SD 2.x": 0}[family]
    assert_same_outputs(model, pipe)


def test_fp16_variant_and_bin_folders_load(saved, tmp_path):
    family, pipe, folder = saved
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model = load(tmp_path / "bin")
    assert_same_outputs(model, pipe)

    half = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16, safety_checker=None)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model = load(tmp_path / "fp16")  # keeps the file's dtype: no fp32 copy of an fp16 model
    assert model.unet.out[2].weight.dtype == torch.float16
    assert torch.equal(model.unet.out[2].weight, pipe.unet.conv_out.weight.half())
    model = load(tmp_path / "fp16", dtype=torch.float32)
    assert model.text_encoder.final_layer_norm.weight.dtype == torch.float32


def test_single_file_export_converts_back_with_diffusers(saved, tmp_path):
    family, pipe, folder = saved
    save_single_file(load(folder), tmp_path / "model.safetensors")
    ckpt = load_file(tmp_path / "model.safetensors")

    unet = sfu.convert_ldm_unet_checkpoint(ckpt, pipe.unet.config)
    vae = sfu.convert_ldm_vae_checkpoint(ckpt, pipe.vae.config)
    if family == "SD 1.x":
        text = sfu.convert_ldm_clip_checkpoint(ckpt)
    else:
        text = sfu.convert_open_clip_checkpoint(pipe.text_encoder, ckpt)
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    for converted, module in ((unet, pipe.unet), (vae, pipe.vae), (text, pipe.text_encoder)):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(converted[k], v), k


def test_single_file_round_trip_keeps_configs(saved, tmp_path):
    family, pipe, folder = saved
    save_single_file(load(folder), tmp_path / "model.safetensors", dtype=torch.float16)
    model = load(tmp_path / "model.safetensors")
    assert (model.version, model.prediction_type) == (family, PRED[family])
    assert model.unet.cfg == TINY_UNET[family] and model.text_encoder.cfg == TINY_TEXT[family]
    assert model.unet.out[2].weight.dtype == torch.float16
    assert torch.equal(model.unet.out[2].weight, pipe.unet.conv_out.weight.half())


def test_diffusers_export_opens_in_diffusers(saved, tmp_path):
    family, pipe, folder = saved
    save_diffusers(load(folder), tmp_path / "out")
    again = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", safety_checker=None)
    assert again.scheduler.config.prediction_type == PRED[family]
    assert again.unet.config.upcast_attention is (family == "SD 2.x")  # 2.x computes attention in fp32
    assert isinstance(again.scheduler, diffusers.DDIMScheduler)
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(again, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name
    assert_same_outputs(load(tmp_path / "out"), pipe)


def openclip_layout(text_state, extra_layer):
    """The SD 2 text encoder as Stability's files store it, written out by hand from transformers'
    names: q, k, v stacked in in_proj, plus what SD never runs (a 24th-style last layer, the projection)."""
    out = {"token_embedding.weight": text_state["embeddings.token_embedding.weight"],
           "positional_embedding": text_state["embeddings.position_embedding.weight"],
           "ln_final.weight": text_state["final_layer_norm.weight"], "ln_final.bias": text_state["final_layer_norm.bias"],
           "text_projection": torch.randn(32, 32), "logit_scale": torch.tensor(4.6)}
    n = 0
    while f"encoder.layers.{n}.layer_norm1.weight" in text_state:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for w in ("weight", "bias"):
            out[dst + f"attn.in_proj_{w}"] = torch.cat([text_state[src + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                out[dst + f"{b}.{w}"] = text_state[src + f"{a}.{w}"]
        n += 1
    for k, v in extra_layer.items():
        out[f"transformer.resblocks.{n}.{k}"] = v
    return out


def test_sd2_single_file_with_openclip_keys(tmp_path):
    pipe = reference_pipeline("SD 2.x", tmp_path)
    save_single_file(load_pipe(pipe, tmp_path), tmp_path / "ours.safetensors")
    ckpt = load_file(tmp_path / "ours.safetensors")
    metadata = {"format": "pt", "minidb": __import__("safetensors").safe_open(
        tmp_path / "ours.safetensors", "pt").metadata()["minidb"]}
    text = {k: v for k, v in ckpt.items() if not k.startswith("cond_stage_model.")}
    last = {k.split(".", 3)[3]: v.clone() for k, v in ckpt.items() if k.startswith("cond_stage_model.model.transformer.resblocks.0.")}
    text.update({"cond_stage_model.model." + k: v
                 for k, v in openclip_layout(pipe.text_encoder.state_dict(), last).items()})
    save_file(text, tmp_path / "openclip.safetensors", metadata=metadata)
    model = load(tmp_path / "openclip.safetensors")
    ids = model.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        assert torch.equal(model.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state)


def load_pipe(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    return load(tmp_path / "pipe")


def test_loading_never_materializes_random_weights(saved, monkeypatch):
    # Modules are built on the meta device and the file's tensors assigned: no init runs on real memory.
    family, pipe, folder = saved
    touched = []
    for name in ("uniform_", "normal_", "kaiming_uniform_", "zeros_", "ones_"):
        original = getattr(torch.nn.init, name)
        def spy(tensor, *args, _original=original, **kwargs):
            touched.append(tensor.device.type)
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.nn.init, name, spy)
    model = load(folder)
    assert touched and set(touched) == {"meta"}  # the spies saw the init, on meta tensors only
    assert not any(p.is_meta for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())


def test_save_only_the_trained_parts(saved, tmp_path):
    # After DreamBooth only the UNet changed: rewrite just it into a folder that holds the rest.
    family, pipe, folder = saved
    model = load(folder)
    save_diffusers(model, tmp_path / "out")
    vae_file = tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"
    vae_bytes = vae_file.read_bytes()
    with torch.no_grad():
        model.unet.out[2].bias.add_(1.0)
    save_diffusers(model, tmp_path / "out", parts=("unet",))
    assert vae_file.read_bytes() == vae_bytes
    again = load(tmp_path / "out")
    assert torch.equal(again.unet.out[2].bias, pipe.unet.conv_out.bias + 1.0)


# ---- the diffusers lines of a full run's README, run as written ----

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
