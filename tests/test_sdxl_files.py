"""SDXL weights in and out, checked against diffusers' own writers, readers and converters.

- A diffusers SDXL folder written by save_pretrained loads in minidb with identical outputs: the UNet
  with its added conditioning, both text encoders (bigG's pooled vector too), the VAE.
- minidb's single-file export, converted back by diffusers' single-file functions, gives exactly the
  tensors it came from; minidb's diffusers export opens in StableDiffusionXLPipeline. The lines a full
  run's README gives, run as written, draw an fp16 export as the fp32 model draws, and read the single
  file of a v-prediction model as v-prediction.
- An SDXL single file written by this test's own renaming (not minidb's saver) loads with the
  architecture read from its tensors.
- The refiner, SDXL inpainting, half files and other kinds are refused in one sentence.
- At SDXL's real size (on the meta device: shapes, no memory) minidb writes and reads exactly the keys
  and shapes that diffusers' converters consume and its modules hold.
"""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_close, diffusers, diffusers_unet, diffusers_vae, randomize_, transformers
from minidb import text_encoder as te, unet as un, vae as va
from minidb.files import ModelFileError
from minidb.info import main
from minidb.load import StableDiffusion, from_original, load
from minidb.save import _transformers_names, save_diffusers, save_single_file, single_file_tensors
from minidb.tokenizer import Tokenizer
from test_bad_input import one_sentence
from test_foreign_files import unet_to_original, vae_to_original
from test_load_save import openclip_layout
from test_run_readme import as_the_readme_says, assert_half_as_the_readme_says, assert_same_weights, draw, readme_code
from test_sdxl import SDXL_UNET, TINY_G, TINY_L, TINY_SDXL_UNET, reference_text
from diffusers.loaders import single_file_utils as sfu

TINY_VAE = dataclasses.replace(va.TINY, scale_factor=va.LATENT_SCALE_XL)
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def tokenizers(tmp):
    """SDXL's two CLIPTokenizers: the second pads with "!" (id 0), as SD 2.x's does."""
    out = []
    for version in ("SD 1.x", "SD 2.x"):
        Tokenizer.for_version(version).save(tmp / version.replace(" ", ""))
        out.append(transformers.CLIPTokenizer.from_pretrained(tmp / version.replace(" ", "")))
    return out


def sdxl_pipeline(tmp, unet, vae, text_encoder, text_encoder_2):
    tok, tok_2 = tokenizers(tmp)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=scheduler)


def tiny_sdxl(tmp, name="diffusers"):
    """(reference StableDiffusionXLPipeline at tiny SDXL-shaped configs, the folder save_pretrained wrote)."""
    pipe = sdxl_pipeline(tmp, diffusers_unet(TINY_SDXL_UNET), diffusers_vae(TINY_VAE), reference_text(TINY_L, seed=2),
                         reference_text(TINY_G, seed=3))
    pipe.save_pretrained(tmp / name)
    return pipe, tmp / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def assert_same_outputs(model, pipe, exact=True):
    """Both towers at the penultimate layer, bigG's pooled vector, the UNet with its added
    conditioning, the VAE decoder: minidb's against the reference pipeline's modules."""
    prompts = ["a photo of sks dog", "wow! a cat on the beach"]
    ids = [tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    assert torch.equal(model.tokenizer(prompts), ids[0]) and torch.equal(model.tokenizer_2(prompts), ids[1])
    same = torch.equal if exact else (lambda a, b: assert_close(a, b) or True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 800])
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])
    with torch.no_grad():
        one, (two, pooled) = model.text_encoder(ids[0]), model.text_encoder_2(ids[1], pooled=True)
        ref_one = pipe.text_encoder(ids[0], output_hidden_states=True)
        ref_two = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        assert same(one, ref_one.hidden_states[-2]) and same(two, ref_two.hidden_states[-2])
        assert same(pooled, ref_two.text_embeds)
        context = torch.cat([one, two], dim=-1)  # (B, 77, 768 + 1280) at real size
        ours = model.unet(x, t, context, torch.cat([pooled, un.size_features(time_ids)], dim=1))
        ref = pipe.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert_close(ours, ref)
        assert_close(model.vae.decode(x), pipe.vae.decode(x).sample)


def test_diffusers_sdxl_folder_loads_with_identical_outputs(saved):
    pipe, folder = saved
    model = load(folder)
    assert (model.version, model.prediction_type) == ("SDXL", "epsilon")
    assert model.unet.cfg == TINY_SDXL_UNET and model.vae.cfg == TINY_VAE
    assert (model.text_encoder.cfg, model.text_encoder_2.cfg) == (TINY_L, TINY_G)  # penultimate, no final LN
    assert (model.tokenizer.pad_id, model.tokenizer_2.pad_id) == (49407, 0)
    assert_same_outputs(model, pipe)
    assert load(folder, dtype=torch.float16).text_encoder_2.text_projection.weight.dtype == torch.float16


def test_single_file_export_converts_back_with_diffusers(saved, tmp_path):
    pipe, folder = saved
    save_single_file(load(folder), tmp_path / "model.safetensors")
    ckpt = load_file(tmp_path / "model.safetensors")
    converted = {"unet": sfu.convert_ldm_unet_checkpoint(ckpt, pipe.unet.config),
                 "vae": sfu.convert_ldm_vae_checkpoint(ckpt, pipe.vae.config),
                 "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()},
                 "text_encoder_2": sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix=XL_OPENCLIP)}
    for name, tensors in converted.items():
        expected = getattr(pipe, name).state_dict()
        assert tensors.keys() == expected.keys(), name
        assert all(torch.equal(tensors[k], v) for k, v in expected.items()), name
    # (diffusers' model-type guess needs bigG's tenth layer: checked at the real size, below)


def test_single_file_round_trip_keeps_configs(saved, tmp_path):
    pipe, folder = saved
    save_single_file(load(folder), tmp_path / "model.safetensors", dtype=torch.float16)
    model = load(tmp_path / "model.safetensors")
    assert (model.version, model.prediction_type) == ("SDXL", "epsilon")
    assert (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg, model.text_encoder_2.cfg) == (
        TINY_SDXL_UNET, TINY_VAE, TINY_L, TINY_G)
    assert torch.equal(model.text_encoder_2.text_projection.weight, pipe.text_encoder_2.text_projection.weight.half())
    assert (model.tokenizer.pad_id, model.tokenizer_2.pad_id) == (49407, 0)


def test_diffusers_export_opens_in_diffusers(saved, tmp_path):
    pipe, folder = saved
    save_diffusers(load(folder), tmp_path / "out")
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, ref = getattr(again, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name
    assert isinstance(again.text_encoder_2, transformers.CLIPTextModelWithProjection)
    s = again.scheduler.config  # SDXL base's scheduler
    assert isinstance(again.scheduler, diffusers.EulerDiscreteScheduler)
    assert (s.timestep_spacing, s.steps_offset, s.beta_schedule, s.beta_start, s.beta_end, s.prediction_type) == (
        "leading", 1, "scaled_linear", 0.00085, 0.012, "epsilon")
    assert again.vae.config.force_upcast and again.vae.config.scaling_factor == 0.13025
    assert again.tokenizer_2.pad_token == "!" and again.config.force_zeros_for_empty_prompt
    assert_same_outputs(load(tmp_path / "out"), pipe)


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")  # 0.42 prefers dtype=, which older ones ignore
@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated")  # the pipeline's own fp32 decode (force_upcast)
def test_an_fp16_export_draws_in_diffusers_as_the_run_readme_says(saved, tmp_path):
    pipe, folder = saved
    model = load(folder)  # SDXL base's files are fp16, and a full run exports in the base's dtype
    save_diffusers(model, tmp_path / "run" / "model", dtype=torch.float16)
    save_single_file(model, tmp_path / "run" / "model.safetensors", dtype=torch.float16)
    calls = readme_code(model, tmp_path / "run", torch.float16)
    assert calls["from_single_file"] == (
        f'StableDiffusionXLPipeline.from_single_file("{tmp_path / "run" / "model.safetensors"}", '
        f'config="{tmp_path / "run" / "model"}", torch_dtype=torch.float16)')
    assert_half_as_the_readme_says(calls, torch.float16, draw(pipe), draw(pipe, seed=6))


def test_a_v_prediction_export_opens_in_diffusers_as_v_prediction(saved, tmp_path):
    """The folder says so in its scheduler config. The single file read by the README's line takes the folder as
    its config; without it diffusers would read an SDXL file as epsilon, since it ignores ComfyUI's v_pred marker
    (single_file_utils.py knows no such key)."""
    pipe, folder = saved
    model = load(folder, prediction_type="v_prediction")
    save_diffusers(model, tmp_path / "run" / "model")
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "run" / "model")
    assert again.scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():  # the file differs from the folder here, so equal weights come from the file
        model.unet.out[2].bias.add_(1.0)
        again.unet.conv_out.bias.add_(1.0)
    save_single_file(model, tmp_path / "run" / "model.safetensors")
    single = as_the_readme_says(readme_code(model, tmp_path / "run", torch.float32)["from_single_file"])
    assert single.scheduler.config.prediction_type == "v_prediction"
    assert isinstance(single.scheduler, diffusers.EulerDiscreteScheduler)
    assert_same_weights(single, again)


# ---- a single file that minidb did not write: the architecture from its tensors ----

# diffusers / transformers keyword arguments with SDXL's conventions (64-wide heads everywhere, no
# attention in the first level, deeper transformers below, bigG with a projection) at tiny sizes.
FOREIGN_UNET = dict(block_out_channels=[64, 128, 128], layers_per_block=2, attention_head_dim=[1, 2, 2],
                    transformer_layers_per_block=[1, 2, 3], cross_attention_dim=64 + 128, use_linear_projection=True,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=96 + 6 * 256)
FOREIGN_L = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96, hidden_act="quick_gelu")
FOREIGN_G = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=200, hidden_act="gelu",
                 projection_dim=96)
# What minidb must read from the tensors alone.
EXPECTED = {"unet": un.UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                                  num_heads=0, head_dim=64, context_dim=192, linear_proj=True, sample_size=128,
                                  transformer_depth=(0, 2, 3), transformer_depth_middle=3, adm_in_channels=1632),
            "vae": TINY_VAE,
            "text_encoder": te.TextEncoderConfig(width=64, layers=2, heads=1, mlp_width=96, skip_last=1, final_norm=False),
            "text_encoder_2": te.TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=200, activation="gelu",
                                                   skip_last=1, final_norm=False, projection=96)}


def bigg_to_original(state):
    """transformers' CLIPTextModelWithProjection -> OpenCLIP's names, as SDXL files store bigG (the
    reverse of diffusers' convert_open_clip_checkpoint): SD 2's hand-written layout (test_load_save.py),
    with text_projection as the (width, projection) matrix of `x @ P`."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = openclip_layout(state, {})
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    return {XL_OPENCLIP + k: v for k, v in out.items()}


def original_sdxl(pipe):
    """The pipeline's weights in the original SDXL layout, with the extras real files carry."""
    unet = pipe.unet.state_dict()
    added = {k: unet.pop(k) for k in list(unet) if k.startswith("add_embedding.")}  # sgm's label_emb
    out = unet_to_original(unet, pipe.unet.config)
    out.update({k.replace("add_embedding.linear_1.", "model.diffusion_model.label_emb.0.0.")
                 .replace("add_embedding.linear_2.", "model.diffusion_model.label_emb.0.2."): v for k, v in added.items()})
    out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    out.update({XL_CLIP + "text_model." + k.removeprefix("text_model."): v
                for k, v in pipe.text_encoder.state_dict().items()})
    out[XL_CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out.update(bigg_to_original(pipe.text_encoder_2.state_dict()))
    out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)  # sgm's DiscreteDenoiser buffer
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foreign-sdxl")
    text = lambda cls, kw, seed: randomize_(cls(transformers.CLIPTextConfig(**kw)), seed)  # noqa: E731
    pipe = sdxl_pipeline(tmp, randomize_(diffusers.UNet2DConditionModel(**FOREIGN_UNET), 0),
                         diffusers_vae(TINY_VAE), text(transformers.CLIPTextModel, FOREIGN_L, 2),
                         text(transformers.CLIPTextModelWithProjection, FOREIGN_G, 3))
    tensors = original_sdxl(pipe)
    save_file(tensors, tmp / "sdxl.safetensors")
    return pipe, tensors, tmp / "sdxl.safetensors"


def test_foreign_file_architecture_is_read_from_the_tensors(foreign):
    pipe, _, path = foreign
    model = load(path)
    assert (model.version, model.prediction_type) == ("SDXL", "epsilon")
    assert {name: getattr(model, name).cfg for name in EXPECTED} == EXPECTED
    assert model.resolution == 256  # SDXL's latent 128, with this VAE's two levels (x2)
    assert_same_outputs(model, pipe, exact=False)


def test_v_prediction_marker(foreign, tmp_path):
    _, tensors, _ = foreign
    save_file({**tensors, "v_pred": torch.tensor([])}, tmp_path / "v.safetensors")  # ComfyUI's marker
    assert load(tmp_path / "v.safetensors").prediction_type == "v_prediction"



def test_a_v_prediction_export_carries_comfyuis_marker(saved, tmp_path):
    """ComfyUI reads an SDXL file as v-prediction only when it holds a tensor named v_pred (its
    supported_models.py, SDXL.model_type: `elif "v_pred" in state_dict`), and otherwise samples it as
    epsilon. minidb writes the marker for a v-prediction model, not for an epsilon one; the file still
    converts in diffusers, and loads in minidb as v-prediction."""
    pipe, folder = saved
    save_single_file(load(folder), tmp_path / "eps.safetensors")
    save_single_file(load(folder, prediction_type="v_prediction"), tmp_path / "v.safetensors")
    assert "v_pred" not in load_file(tmp_path / "eps.safetensors")
    ckpt = load_file(tmp_path / "v.safetensors")
    assert ckpt["v_pred"].numel() == 0
    assert sfu.convert_ldm_unet_checkpoint(ckpt, pipe.unet.config).keys() == pipe.unet.state_dict().keys()
    assert load(tmp_path / "v.safetensors").prediction_type == "v_prediction"  # (the marker alone: the test below)

def without(tensors, prefix):
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def widened_input(tensors, channels):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = tensors[key]
    return {**tensors, key: torch.zeros(w.shape[0], channels, *w.shape[2:])}


@pytest.mark.parametrize("make,words", [
    (lambda t: {k.replace(XL_OPENCLIP, "conditioner.embedders.0.model."): v for k, v in without(t, XL_CLIP).items()},
     "is the SDXL refiner"),
    (lambda t: widened_input(t, 9), "is an SDXL inpainting model"),
    (lambda t: without(t, XL_OPENCLIP), "a partial SDXL checkpoint (it lacks the OpenCLIP-bigG text encoder"),
    (lambda t: without(t, XL_CLIP), "a partial SDXL checkpoint (it lacks the CLIP-L text encoder"),
    (lambda t: {**t, "ztsnr": torch.tensor([]), "v_pred": torch.tensor([])}, "zero-terminal-SNR"),
    (lambda t: {**t, "edm_mean": torch.zeros(4), "edm_std": torch.ones(4)}, "Playground v2.5"),
])
def test_other_sdxl_kinds_are_refused_in_one_sentence(foreign, tmp_path, make, words):
    save_file(make(foreign[1]), tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    message = one_sentence(e)
    assert words in message and "not this kind yet" in message, message


@pytest.mark.parametrize("drop,words", [
    (XL_OPENCLIP + "text_projection", "the second text encoder's architecture cannot be read from its tensors (it has no text_projection)"),
    ("model.diffusion_model.label_emb.0.0.weight", "the UNet's architecture cannot be read from its tensors (it has no label_emb.0.0.weight)"),
    ("model.diffusion_model.label_emb.0.2.bias", "1 missing tensors (label_emb.0.2.bias)"),
])
def test_damaged_sdxl_file_names_what_is_wrong(foreign, tmp_path, drop, words):
    save_file({k: v for k, v in foreign[1].items() if k != drop}, tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    assert words in one_sentence(e)


def test_parts_that_do_not_fit_together(saved, tmp_path):
    pipe, folder = saved
    save_single_file(load(folder), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        saved_configs = json.loads(f.metadata()["minidb"])
    saved_configs["unet"]["adm_in_channels"] += 8
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors",
              metadata={"minidb": json.dumps(saved_configs)})
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "bad.safetensors")
    assert "does not fit together (its UNet's added conditioning takes 1560 features" in one_sentence(e)
    del saved_configs["text_encoder_2"]
    save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors",
              metadata={"minidb": json.dumps(saved_configs)})
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "bad.safetensors")
    assert "the metadata has no fields text_encoder_2" in one_sentence(e)


def test_refiner_and_half_diffusers_folders(saved, tmp_path):
    pipe, folder = saved
    save_diffusers(load(folder), tmp_path / "half", parts=("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "half")
    assert "is half an SDXL model (its UNet has SDXL's added conditioning, but the folder has no text_encoder_2/)" in \
        one_sentence(e)
    save_diffusers(load(folder), tmp_path / "refiner", parts=("unet", "vae", "text_encoder_2", "tokenizer_2"))
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "refiner")
    assert "is the SDXL refiner" in one_sentence(e)


# ---- python -m minidb.info ----

def test_info_describes_and_converts_sdxl_both_ways(saved, tmp_path, capsys):
    pipe, folder = saved
    save_single_file(load(folder), tmp_path / "m.safetensors")
    assert main([str(tmp_path / "m.safetensors"), "--convert", str(tmp_path / "folder")]) == 0
    out = capsys.readouterr().out
    assert "SDXL, predicts epsilon" in out and "text_encoder_2" in out and "projection=16" in out
    assert "tokenizer      pads with id 49407" in out and "tokenizer_2    pads with id 0" in out
    assert main([str(tmp_path / "folder"), "--convert", str(tmp_path / "back.safetensors")]) == 0
    for path in (tmp_path / "folder", tmp_path / "back.safetensors"):
        model = load(path)
        assert model.version == "SDXL" and model.text_encoder_2.cfg == TINY_G
        assert_same_outputs(model, pipe)


# ---- the real SDXL size, on the meta device ----

def test_real_sdxl_keys_and_shapes_agree_with_diffusers():
    with torch.device("meta"):
        model = StableDiffusion(Tokenizer.for_version("SD 1.x"), te.TextEncoder(te.SDXL_L), va.AutoencoderKL(va.SDXL),
                                un.UNet(un.SDXL), "SDXL", "epsilon", Tokenizer.for_version("SD 2.x"),
                                te.TextEncoder(te.SDXL_G))
        ckpt = single_file_tensors(model)
        reference = {"unet": diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if k[0] != "_"}),
                     "vae": diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                                    latent_channels=4, scaling_factor=0.13025,
                                                    down_block_types=["DownEncoderBlock2D"] * 4,
                                                    up_block_types=["UpDecoderBlock2D"] * 4),
                     "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(
                         hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         hidden_act="quick_gelu")),
                     "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                         hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                         hidden_act="gelu", projection_dim=1280))}
    # diffusers' converters consume minidb's single-file keys and give every tensor of its modules
    converted = {"unet": sfu.convert_ldm_unet_checkpoint(ckpt, reference["unet"].config),
                 "vae": sfu.convert_ldm_vae_checkpoint(ckpt, reference["vae"].config),
                 "text_encoder": {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()},
                 "text_encoder_2": sfu.convert_open_clip_checkpoint(reference["text_encoder_2"], ckpt, prefix=XL_OPENCLIP)}
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": XL_CLIP,
                "text_encoder_2": XL_OPENCLIP}
    for name, tensors in converted.items():
        theirs = reference[name].state_dict()
        assert tensors.keys() == theirs.keys(), name
        assert all(tensors[k].shape == v.shape for k, v in theirs.items()), name
        ours = [k for k in ckpt if k.startswith(prefixes[name])]  # nothing left over: one key per tensor,
        stacked = 4 * 32 if name == "text_encoder_2" else 0  # but OpenCLIP's in_proj holds q, k, v
        assert len(ours) + stacked == len(theirs), name
    assert sfu.infer_diffusers_model_type(ckpt) == "xl_base"
    # minidb reads the published architecture back from the tensors alone (and real files' extras)
    extras = {XL_CLIP + "text_model.embeddings.position_ids": torch.arange(77)[None],
              XL_OPENCLIP + "logit_scale": torch.tensor(4.6052), "denoiser.sigmas": torch.zeros(1000)}
    again = from_original({**ckpt, **extras}, {}, "sd_xl_base_1.0.safetensors", device=torch.device("meta"))
    assert (again.unet.cfg, again.vae.cfg, again.text_encoder.cfg, again.text_encoder_2.cfg) == (
        un.SDXL, va.SDXL, te.SDXL_L, te.SDXL_G)
    assert again.resolution == 1024 and again.prediction_type == "epsilon"
    # and its diffusers names for bigG are transformers' CLIPTextModelWithProjection's
    names = _transformers_names(model.text_encoder_2)
    theirs = reference["text_encoder_2"].state_dict()
    assert names.keys() == theirs.keys() and all(names[k].shape == v.shape for k, v in theirs.items())
