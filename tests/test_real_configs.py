"""The real Stable Diffusion 1.5 and 2.1 configs, with small inputs.

The tiny configs of test_models.py walk every code path in seconds; these tests add what only the
real sizes can show:

- The published config.json files of the public diffusers repositories translate into minidb's
  presets, and minidb's exported configs agree with them: the presets rest on published facts.
- The reference models built from those published configs (diffusers, transformers) and minidb's
  twins sharing their random weights give the same outputs: UNet (ε config of 1.5; Linear
  projections, head dim 64, upcast attention of 2.1), VAE encode and decode, both text encoders on
  real token ids.
- An original-layout fp16 single file without minidb's metadata, as AUTOMATIC1111 and ComfyUI users
  have them (extras included: EMA keys, DDPM buffers, position_ids; for SD 2 the OpenCLIP layout with
  the 24th layer, text_projection and logit_scale), loads with the presets and the v-prediction guess;
  diffusers' own single-file converters read the same tensors back into the reference models' state.

Each family's models are built once per module (several GB in fp32) and freed before the next one.
"""

import dataclasses
import gc
import inspect
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_close, diffusers, randomize_, text_twin, transformers, unet_twin, vae_twin
from minidb import text_encoder as te, unet as un, vae as va
from minidb.convert import (text_config_from_transformers, text_config_to_transformers, unet_config_from_diffusers,
                            unet_config_to_diffusers, vae_config_from_diffusers, vae_config_to_diffusers)
from minidb.load import StableDiffusion, load
from minidb.single_file import CLIP, OPENCLIP, UNET
from minidb.save import save_single_file
from minidb.tokenizer import Tokenizer
from diffusers.loaders import single_file_utils as sfu

pytestmark = pytest.mark.slow

# ---- the published configs, as config.json has them (JSON true/false/null -> True/False/None) ----
# huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/...) and
# huggingface.co/stabilityai/stable-diffusion-2-1 (the 768 v-prediction model). Values checked against
# copies quoted in public code: kohya-ss/sd-scripts library/original_unet.py (both UNet config.json
# files verbatim), library/model_util.py (the SD 2 text encoder's CLIPTextConfig, with its
# transformers_version 4.25.0.dev0), and open-mmlab/mmagic configs/stable_diffusion (the SD 1.5 VAE).

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True,
}
SD21_TEXT = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
    "projection_dim": 512, "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408,
}

FAMILIES = ["SD 1.x", "SD 2.x"]
PUBLISHED = {"SD 1.x": (SD15_UNET, SD15_TEXT), "SD 2.x": (SD21_UNET, SD21_TEXT)}
PRESETS = {"SD 1.x": (un.SD1, te.SD1), "SD 2.x": (dataclasses.replace(un.SD2, sample_size=96), te.SD2)}
# Keys of a CLIPTextConfig that shape the network; the rest (token ids of the pooled output, the
# projection head's width) belong to parts of CLIP that SD never runs.
TEXT_ARCHITECTURE = ["vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps"]
# The tensor ComfyUI's v-prediction test looks at (supported_models.py, SD20.model_type).
V_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"


# ---- configs: published facts -> presets, and back ----

@pytest.mark.parametrize("family", FAMILIES)
def test_published_configs_translate_to_the_presets(family):
    unet_json, text_json = PUBLISHED[family]
    unet_preset, text_preset = PRESETS[family]
    assert unet_config_from_diffusers(unet_json) == unet_preset
    assert text_config_from_transformers(text_json) == text_preset
    assert vae_config_from_diffusers(SD15_VAE) == va.SD
    # DESIGN facts the translators do not decide: SD 1 has 8 heads (dims 40/80/160), SD 2 head dim 64.
    expected_heads = {"SD 1.x": [(8, 40), (8, 80), (8, 160)], "SD 2.x": [(5, 64), (10, 64), (20, 64)]}[family]
    assert [unet_preset.heads_for(320 * m) for m in (1, 2, 4)] == expected_heads


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}


def _assert_agrees(ours, published, cls):
    """Every key minidb writes has the published value (or, where config.json leaves a key out, the
    reference class's default, which is what diffusers then uses)."""
    expected = {**_defaults(cls), **published}
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  JSON has lists, Python tuples
    wrong = {k: (v, expected.get(k)) for k, v in ours.items() if plain(v) != plain(expected.get(k))}
    assert not wrong, f"(ours, published) differ: {wrong}"


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_configs_agree_with_the_published_ones(family):
    unet_json, text_json = PUBLISHED[family]
    unet_preset, text_preset = PRESETS[family]
    _assert_agrees(unet_config_to_diffusers(unet_preset), unet_json, diffusers.UNet2DConditionModel)
    _assert_agrees(vae_config_to_diffusers(va.SD, sample_size=512), SD15_VAE, diffusers.AutoencoderKL)
    ours = text_config_to_transformers(text_preset)
    assert {k: ours[k] for k in TEXT_ARCHITECTURE} == {k: text_json[k] for k in TEXT_ARCHITECTURE}


# ---- the reference models at real size, and minidb's twins ----

def materialize(build, seed):
    """Build a reference model fast: no initialization on the meta device, then memory and random
    weights (conftest.randomize_). Buffers get their real values back."""
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    buffers = dict(module.named_buffers())
    assert all(name.endswith("position_ids") for name in buffers), f"unexpected buffers {list(buffers)}"
    with torch.no_grad():
        for b in buffers.values():  # CLIP's 0..76 positions
            b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
    return randomize_(module, seed)


def reference_unet(config_json):
    return materialize(lambda: diffusers.UNet2DConditionModel(
        **{k: v for k, v in config_json.items() if not k.startswith("_")}), seed=0)


def reference_vae(config_json):
    return materialize(lambda: diffusers.AutoencoderKL(
        **{k: v for k, v in config_json.items() if not k.startswith("_")}), seed=1)


def reference_text_encoder(config_json):
    config = transformers.CLIPTextConfig(**{k: v for k, v in config_json.items() if not k.startswith("_")})
    return materialize(lambda: transformers.CLIPTextModel(config), seed=2)


def set_spread_(bias, std):
    """Overwrite a bias with ±std in random order: its standard deviation is exactly std."""
    order = torch.randperm(bias.numel(), generator=torch.Generator().manual_seed(3))
    signs = torch.tensor([1.0, -1.0]).repeat(bias.numel() // 2)[order]
    with torch.no_grad():
        bias.copy_(std * signs)


@pytest.fixture(scope="module", params=FAMILIES)
def real(request):
    """A family's reference UNet and text encoder and minidb's twins of them (shared tensors)."""
    family = request.param
    (unet_json, text_json), (unet_cfg, text_cfg) = PUBLISHED[family], PRESETS[family]
    m = SimpleNamespace(family=family, ref_unet=reference_unet(unet_json), ref_text=reference_text_encoder(text_json))
    m.unet, m.text = unet_twin(m.ref_unet, unet_cfg), text_twin(m.ref_text, text_cfg)
    # Real 768-v weights: the spread of this LayerNorm bias is above ComfyUI's 0.09 (ε models: below).
    # Set it through the twin: the reference sees the same tensor.
    set_spread_(m.unet.get_parameter(V_PROBE), 0.1)
    assert m.ref_unet.up_blocks[3].attentions[2].transformer_blocks[0].norm1.bias.std(unbiased=False) > 0.0999
    yield m
    m.__dict__.clear()  # the last references: free several GB before the next family is built
    gc.collect()


@pytest.fixture(scope="module")
def vae():
    """SD's VAE (the same in 1.x and 2.x) and minidb's twin."""
    m = SimpleNamespace(ref=reference_vae(SD15_VAE))
    m.ours = vae_twin(m.ref, va.SD)
    yield m
    m.__dict__.clear()
    gc.collect()


def millions(module):
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


@pytest.mark.parametrize("real", ["SD 1.x"], indirect=True)
def test_sd15_parameter_counts(real, vae):
    # DESIGN.md: 859.5 M in the UNet, 83.7 M in the VAE; for the published configs and for minidb's
    # presets (built on the meta device, which costs nothing).
    with torch.device("meta"):
        ours_unet, ours_vae = un.UNet(un.SD1), va.AutoencoderKL(va.SD)
    assert millions(real.ref_unet) == millions(ours_unet) == 859.5
    assert millions(vae.ref) == millions(ours_vae) == 83.7


def test_unet_matches_diffusers(real):
    cfg = real.unet.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)  # 128 px: a 2x2 latent at the lowest level
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    t = torch.tensor([37, 912])  # each sample its own timestep, as in training
    with torch.no_grad():
        ours, ref = real.unet(x, t, context), real.ref_unet(x, t, context).sample
    assert ours.shape == (2, 4, 16, 16)
    assert_close(ours, ref)


def test_text_encoder_matches_transformers(real):
    tokenizer = Tokenizer.for_version(real.family)
    ids = tokenizer(["a photo of sks dog", "A DSLR photo of an astronaut riding a horse on Mars, highly detailed"])
    assert ids.shape == (2, 77) and (ids[:, 0] == 49406).all()
    assert (ids[0, 7:] == tokenizer.pad_id).all()  # padded: the whole sequence runs, as SD runs it
    with torch.no_grad():
        ours, ref = real.text(ids), real.ref_text(ids).last_hidden_state
    assert ours.shape == (2, 77, real.text.cfg.width)
    assert_close(ours, ref)


def test_vae_encode_decode_match_diffusers(vae):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        post, ref_post = vae.ours.encode(image), vae.ref.encode(image).latent_dist
        assert post.mean.shape == (2, 4, 8, 8)
        assert_close(post.mean, ref_post.mean)
        assert_close(post.logvar, ref_post.logvar)
        z = torch.randn(2, 4, 8, 8, generator=g)
        decoded, ref_decoded = vae.ours.decode(z), vae.ref.decode(z).sample
    assert decoded.shape == (2, 3, 64, 64)
    assert_close(decoded, ref_decoded)


# ---- an original single file at real size, as other tools write it ----

def extras(family, tensors):
    """What real files hold besides the weights SD runs; minidb must accept and ignore all of it."""
    g = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.rand(shape, generator=g).half()  # noqa: E731
    out = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
           # EMA copies are keyed with the dots of the name removed
           "model_ema.diffusion_modeltime_embed0weight": rand(1280, 320),
           "model_ema.diffusion_modelout2bias": rand(4),
           "betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.linspace(1, 0, 1000)}
    if family == "SD 1.x":
        out[CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:  # the OpenCLIP ViT-H text tower has 24 layers (SD 2 stops at the 23rd) and a projection head
        for k, t in tensors.items():
            if k.startswith(OPENCLIP + "transformer.resblocks.22."):
                out[k.replace(".22.", ".23.")] = rand(*t.shape)
        out[OPENCLIP + "text_projection"] = rand(1024, 1024)
        out[OPENCLIP + "logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)  # ln(100)
    return out


@pytest.fixture(scope="module")
def original_file(real, vae, tmp_path_factory):
    """An fp16 original-layout .safetensors of the family's reference weights, with the extras of
    real files and without minidb's config metadata."""
    folder = tmp_path_factory.mktemp(real.family.replace(" ", "").replace(".", ""))
    model = StableDiffusion(Tokenizer.for_version(real.family), real.text, vae.ours, real.unet, real.family,
                            "epsilon")
    save_single_file(model, folder / "exported.safetensors", dtype=torch.float16)
    tensors = load_file(folder / "exported.safetensors")  # drops the metadata
    (folder / "exported.safetensors").unlink()
    tensors.update(extras(real.family, tensors))
    save_file(tensors, folder / "original.safetensors")
    del tensors
    gc.collect()
    yield folder / "original.safetensors"
    for f in folder.glob("*.safetensors"):  # GBs each: pytest keeps old tmp folders around
        f.unlink()


def assert_same_weights(module, twin):
    """Every tensor of a loaded module is the fp16 rounding of the reference (twin) weight."""
    expected = twin.state_dict()
    loaded = module.state_dict()
    assert loaded.keys() == expected.keys()
    for k, t in loaded.items():
        assert t.dtype == torch.float16, k
        assert torch.equal(t, expected[k].half()), k


def test_original_file_loads_with_the_presets(real, vae, original_file):
    with safe_open(original_file, "pt") as f:
        assert "minidb" not in (f.metadata() or {})  # nothing to read the configs from
        keys = set(f.keys())
    assert (OPENCLIP + "transformer.resblocks.0.attn.in_proj_weight" in keys) == (real.family == "SD 2.x")
    model = load(original_file)
    unet_cfg, text_cfg = PRESETS[real.family]
    assert model.version == real.family
    # SD 1.x is always ε; SD 2.x is guessed v from the wide bias spread set in the `real` fixture.
    assert model.prediction_type == {"SD 1.x": "epsilon", "SD 2.x": "v_prediction"}[real.family]
    assert (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg) == (unet_cfg, va.SD, text_cfg)
    assert model.resolution == {"SD 1.x": 512, "SD 2.x": 768}[real.family]
    assert model.tokenizer.pad_id == {"SD 1.x": 49407, "SD 2.x": 0}[real.family]
    assert_same_weights(model.unet, real.unet)
    assert_same_weights(model.vae, vae.ours)
    assert_same_weights(model.text_encoder, real.text)


def test_diffusers_converts_the_file_to_the_reference_state(real, vae, original_file):
    ckpt = load_file(original_file)
    converted = {"unet": sfu.convert_ldm_unet_checkpoint(ckpt, real.ref_unet.config),
                 "vae": sfu.convert_ldm_vae_checkpoint(ckpt, vae.ref.config)}
    text = sfu.convert_ldm_clip_checkpoint(ckpt) if real.family == "SD 1.x" else \
        sfu.convert_open_clip_checkpoint(real.ref_text, ckpt)
    # diffusers names them as transformers 4 did; transformers 5's state dict has no prefix
    assert all(k.startswith("text_model.") for k in text), "not the text-encoder layout of real files"
    converted["text"] = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    del ckpt, text
    for name, ref in (("unet", real.ref_unet), ("vae", vae.ref), ("text", real.ref_text)):
        expected = ref.state_dict()
        assert converted[name].keys() == expected.keys(), name
        wrong = [k for k, v in expected.items() if not torch.equal(converted[name][k], v.half())]
        assert not wrong, f"{name}: {len(wrong)} tensors differ ({wrong[:3]})"
        del converted[name]


@pytest.mark.parametrize("real", ["SD 2.x"], indirect=True)
def test_sd2_prediction_type_guess_and_override(real, original_file):
    model = load(original_file)  # bias spread 0.1 > 0.09: a 768 v-prediction model
    assert (model.prediction_type, model.unet.cfg.sample_size) == ("v_prediction", 96)
    del model
    model = load(original_file, prediction_type="epsilon")  # the user's word beats the guess
    assert (model.prediction_type, model.unet.cfg.sample_size) == ("epsilon", 64)
    del model

    narrow = original_file.with_name("narrow.safetensors")
    tensors = load_file(original_file)
    set_spread_(tensors[UNET + V_PROBE], 0.08)  # below the threshold: a 512 ε "base" model
    save_file(tensors, narrow)
    del tensors
    gc.collect()
    model = load(narrow)
    assert (model.prediction_type, model.unet.cfg.sample_size) == ("epsilon", 64)
    assert model.unet.get_parameter(V_PROBE).float().std(unbiased=False) < 0.0801
    del model
    model = load(narrow, prediction_type="v_prediction")
    assert (model.prediction_type, model.unet.cfg.sample_size) == ("v_prediction", 96)
    del model
    narrow.unlink()
