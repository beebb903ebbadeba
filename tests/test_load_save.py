"""Weights in and out, checked against diffusers' own writers and readers.

- A diffusers folder written by diffusers' save_pretrained (fp32, fp16 variant, .bin) loads in minidb
  with identical weights and outputs.
- minidb's single-file export, converted back by diffusers' single-file conversion functions, gives
  exactly the diffusers model it came from; minidb's diffusers export opens in diffusers.
- An SD 2 single file with OpenCLIP keys loads correctly. (Files that minidb did not write, such as
  a Lightning .ckpt, are tested in test_foreign_files.py.)
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_TEXT, assert_close, TINY_UNET, diffusers, diffusers_unet, diffusers_vae, transformers, transformers_text_encoder
from minidb import vae as va
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
