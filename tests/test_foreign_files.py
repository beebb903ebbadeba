"""Single files that minidb did not write, in architectures other than SD 1.x/2.x's sizes.

Tiny models with random weights are built by diffusers and transformers from configs unlike minidb's
tiny presets (three levels, two res blocks, attention on some levels only, other text widths and
depths), then renamed to the original CompVis/Stability layout by the rules written out below, which
follow diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, not minidb.convert. Such
a file carries no configs: minidb must read the architecture from the tensors and then draw the same
picture as diffusers' StableDiffusionPipeline on the same weights.
"""

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import diffusers, randomize_, transformers
from minidb import detect, text_encoder as te, unet as un, vae as va
from minidb.convert import native_to_openclip
from minidb.files import ModelFileError, read_tensors
from minidb.load import load
from minidb.pipeline import decode, sample_latents
from minidb.tokenizer import Tokenizer
from test_bad_input import one_sentence
from test_load_save import openclip_layout

FAMILIES = ["SD 1.x", "SD 2.x"]
# diffusers / transformers keyword arguments. SD 1.x style: 8 heads, conv projections, attention on the
# lower two levels only; SD 2.x style: 64-wide heads (diffusers counts heads per level), Linear
# projections, attention on the outer levels; OpenCLIP-style text tower with one more layer in the file.
CONFIGS = {
    "SD 1.x": dict(
        unet=dict(block_out_channels=[64, 64, 128], layers_per_block=2, attention_head_dim=8, cross_attention_dim=128,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
        vae=dict(block_out_channels=[32, 64, 64], layers_per_block=1),
        text=dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=200,
                  hidden_act="quick_gelu"),
        prediction_type="epsilon"),
    "SD 2.x": dict(
        unet=dict(block_out_channels=[64, 128, 192], layers_per_block=2, attention_head_dim=[1, 2, 3],
                  cross_attention_dim=192, use_linear_projection=True, upcast_attention=True,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]),
        vae=dict(block_out_channels=[32, 64], layers_per_block=2),
        text=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=256,
                  hidden_act="gelu"),
        prediction_type="v_prediction"),
}
# What minidb must read from the tensors alone.
EXPECTED = {
    "SD 1.x": (un.UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=2, attention_levels=(1, 2),
                             num_heads=8, context_dim=128),
               va.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
               te.TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=200)),
    "SD 2.x": (un.UNetConfig(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=2, attention_levels=(0, 2),
                             num_heads=0, head_dim=64, context_dim=192, linear_proj=True, upcast_attention=True,
                             sample_size=96),
               va.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2),
               te.TextEncoderConfig(width=192, layers=2, heads=3, mlp_width=256, activation="gelu")),
}


# ---- diffusers names -> original names, as diffusers' conversion script does it ----

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_original(state, config):
    """The script's unet_conversion_map / _resnet / _layer, its loops over 4 levels, 2 res blocks and
    attention in levels 0-2 opened up to any config."""
    levels, n_res = len(config["block_out_channels"]), config["layers_per_block"]
    attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    layer = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(levels):
        for j in range(n_res):
            n = (n_res + 1) * i + j + 1
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."))
            if attn[i]:
                layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1."))
        if i < levels - 1:
            layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(n_res + 1) * (i + 1)}.0.op."))
        up_attn = attn[levels - 1 - i]  # diffusers counts up_blocks from the bottom level
        for j in range(n_res + 1):
            n = (n_res + 1) * i + j
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."))
            if up_attn:
                layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1."))
        if i < levels - 1:
            n = (n_res + 1) * i + n_res  # the upsampler follows the level's last res block (and attention)
            layer.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n}.{2 if up_attn else 1}."))
    out = {}
    for key, t in state.items():
        if "resnets" in key:
            for hf, sd in UNET_RESNET:
                key = key.replace(hf, sd)
        hf, sd = next(pair for pair in layer if key.startswith(pair[0]))
        out["model.diffusion_model." + sd + key[len(hf):]] = t
    return out


def vae_to_original(state, config):
    """The script's vae_conversion_map and vae_conversion_map_attn (in today's to_q/to_out.0 names);
    attention weights go back from Linear (C, C) to 1x1 conv (C, C, 1, 1)."""
    levels, n_res = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
             ("mid_block.attentions.0.", "mid.attn_1."), ("mid_block.resnets.0.", "mid.block_1."),
             ("mid_block.resnets.1.", "mid.block_2.")]
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(n_res)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.")
                  for j in range(n_res + 1)]
        if i < levels - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                      (f"up_blocks.{i}.upsamplers.0.", f"up.{levels - 1 - i}.upsample.")]
    attention = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]
    out = {}
    for key, t in state.items():
        for hf, sd in pairs:
            key = key.replace(hf, sd)
        if "mid.attn_1." in key:
            for hf, sd in attention:
                key = key.replace(hf, sd)
            t = t[:, :, None, None] if t.ndim == 2 else t
        out["first_stage_model." + key] = t
    return out


def text_to_original(state, family):
    """SD 1: transformers' names under cond_stage_model.transformer.text_model. SD 2: OpenCLIP's, with
    an extra last layer that SD never runs (its files keep ViT-H's 24th)."""
    if family == "SD 1.x":
        return {"cond_stage_model.transformer.text_model." + k: t for k, t in state.items()}
    first = {k.removeprefix("transformer.resblocks.0."): torch.randn_like(t)
             for k, t in openclip_layout(state, {}).items() if k.startswith("transformer.resblocks.0.")}
    return {"cond_stage_model.model." + k: t for k, t in openclip_layout(state, first).items()}


# ---- the reference pipeline and its file ----

def set_spread_(bias, std):
    """Overwrite a bias with ±std: its standard deviation is exactly std."""
    with torch.no_grad():
        bias.copy_(std * torch.tensor([1.0, -1.0]).repeat(bias.numel() // 2))


def reference(family, tmp):
    c = CONFIGS[family]
    Tokenizer.for_version(family).save(tmp / "tok")
    unet = randomize_(diffusers.UNet2DConditionModel(**c["unet"], sample_size=32), seed=0)
    if family == "SD 2.x":  # ComfyUI's v-prediction test reads this bias's spread: make it v-like
        levels, n_res = len(c["unet"]["block_out_channels"]), c["unet"]["layers_per_block"]
        set_spread_(unet.up_blocks[levels - 1].attentions[n_res].transformer_blocks[0].norm1.bias, 0.1)
    n = len(c["vae"]["block_out_channels"])
    vae = randomize_(diffusers.AutoencoderKL(**c["vae"], latent_channels=4, up_block_types=["UpDecoderBlock2D"] * n,
                                             down_block_types=["DownEncoderBlock2D"] * n), seed=1)
    text = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**c["text"], vocab_size=49408,
                                                                            max_position_embeddings=77)), seed=2)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type=c["prediction_type"])
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, scheduler=scheduler,
                                             tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp / "tok"),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tensors = {**unet_to_original(unet.state_dict(), c["unet"]), **vae_to_original(vae.state_dict(), c["vae"]),
               **text_to_original(text.state_dict(), family)}
    return pipe, tensors


@pytest.fixture(scope="module", params=FAMILIES)
def foreign(request, tmp_path_factory):
    """(family, reference pipeline, original-layout tensors, their file without minidb metadata)."""
    tmp = tmp_path_factory.mktemp(request.param.replace(" ", "").replace(".", ""))
    pipe, tensors = reference(request.param, tmp)
    save_file(tensors, tmp / "model.safetensors")
    return request.param, pipe, tensors, tmp / "model.safetensors"


def test_architecture_is_read_from_the_tensors(foreign):
    family, pipe, tensors, path = foreign
    model = load(path)
    assert (model.version, model.prediction_type) == (family, CONFIGS[family]["prediction_type"])
    assert (model.unet.cfg, model.vae.cfg, model.text_encoder.cfg) == EXPECTED[family]


def test_same_picture_as_diffusers(foreign):
    family, pipe, tensors, path = foreign
    model = load(path)
    same = dict(negative_prompt="blurry", height=32, width=32)
    latents = sample_latents(model, "a photo of sks dog", steps=4, guidance=6.0, seed=3, sampler="ddim", progress=False,
                             **same)

    def reference_run(output_type):
        return pipe("a photo of sks dog", num_inference_steps=4, guidance_scale=6.0, output_type=output_type,
                    generator=torch.Generator("cpu").manual_seed(3), **same).images

    ref = reference_run("latent")
    side = 32 // 2 ** (len(CONFIGS[family]["vae"]["block_out_channels"]) - 1)  # SD 1.x style: 4x down, SD 2.x: 2x
    assert latents.shape == ref.shape == (1, 4, side, side)
    err = (latents - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"latents differ by {err}"
    images = np.stack([np.asarray(im) for im in decode(model, latents)]).astype(np.float64)
    ref_images = (reference_run("np") * 255).round()  # as diffusers rounds for its PIL output
    assert images.shape == ref_images.shape == (1, 32, 32, 3)
    assert np.abs(images - ref_images).max() <= 1


def test_real_sd_sizes_are_read_as_the_presets():
    # The shapes of the real SD 1.5 / 2.1 files, on the meta device: no memory. The real files,
    # extras included, are loaded in test_real_configs.py (slow).
    for family, unet_cfg, text_cfg in (("SD 1.x", un.SD1, te.SD1), ("SD 2.x", un.SD2, te.SD2)):
        with torch.device("meta"):
            unet = un.UNet(unet_cfg).state_dict()
            vae = va.AutoencoderKL(va.SD).state_dict()
            text = te.TextEncoder(text_cfg).state_dict()
        if family == "SD 2.x":  # Stability's files have ViT-H's 24th layer too
            text = native_to_openclip(text)
            text.update({k.replace(".0.", ".23.", 1): t for k, t in text.items() if ".resblocks.0." in k})
        for pred, size in (("epsilon", 64), ("v_prediction", 96)):
            assert detect.unet_config(unet, family, pred, "f") == dataclasses.replace(unet_cfg, sample_size=size)
        assert detect.vae_config(vae, "f") == va.SD
        assert detect.text_config(text, family, "f") == text_cfg


def lightning_checkpoint(state, path, monkeypatch):
    """torch.save a Lightning-style training checkpoint around `state`, as without Lightning installed."""
    # Lightning keyed callback state by the callback class; build such a class without Lightning.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1)}}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # the reader must not need Lightning


def test_lightning_ckpt_with_ema_optimizer_state_and_fp16(tmp_path, monkeypatch):
    pipe, tensors = reference("SD 1.x", tmp_path)
    state = {k: t.half() for k, t in tensors.items()}
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10),
                  "model_ema.diffusion_modelout2weight": torch.zeros(4, 64, 3, 3, dtype=torch.float16),
                  "alphas_cumprod": torch.linspace(1, 0, 1000), "betas": torch.linspace(0, 1, 1000),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    lightning_checkpoint(state, tmp_path / "train.ckpt", monkeypatch)
    model = load(tmp_path / "train.ckpt", dtype=torch.float32)
    assert model.version == "SD 1.x" and model.unet.cfg == EXPECTED["SD 1.x"][0]
    assert torch.equal(model.unet.out[2].weight, pipe.unet.conv_out.weight.half().float())
    assert torch.equal(model.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight.half().float())


@pytest.fixture
def torch_2_4_serialization(monkeypatch):
    """torch.serialization as torch 2.4 has it: no safe_globals context manager (it came in 2.5), only the
    process-wide list of allowed globals, which is put back as it was afterwards."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    kept = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(kept)


def test_checkpoints_load_on_torch_2_4(torch_2_4_serialization, tmp_path, monkeypatch):
    """minidb runs on torch >= 2.4 (DESIGN.md): there a pickle checkpoint with numpy scalars, as train.py's
    state.pt and most .ckpt files hold, still loads; Lightning's callback, which needs a name alias that
    2.4 cannot register, is refused in one sentence rather than a traceback."""
    tensors = {"a": torch.arange(3.0)}
    torch.save({"state_dict": tensors, "global_step": 3, "score": np.float64(0.5)}, tmp_path / "plain.ckpt")
    data, _ = read_tensors(tmp_path / "plain.ckpt")
    assert torch.equal(data["state_dict"]["a"], tensors["a"]) and data["score"] == 0.5
    lightning_checkpoint(tensors, tmp_path / "train.ckpt", monkeypatch)
    with pytest.raises(ModelFileError, match=r"holds pickled Python objects besides tensors "
                                             r"\(pytorch_lightning\.callbacks\.model_checkpoint\.ModelCheckpoint\)"):
        read_tensors(tmp_path / "train.ckpt")


def widened(t, key, dim=0, by=32):
    """A copy of the file's tensors with `key` grown along `dim`."""
    out = dict(t)
    shape = list(out[key].shape)
    shape[dim] += by
    out[key] = torch.zeros(shape)
    return out


U, V = "model.diffusion_model.", "first_stage_model."


@pytest.fixture(scope="module")
def sd2_tensors(tmp_path_factory):
    return reference("SD 2.x", tmp_path_factory.mktemp("sd2"))[1]


@pytest.mark.parametrize("damage,part,detail", [
    (lambda t: widened(t, U + "input_blocks.2.0.in_layers.2.weight"), "UNet", "equally wide res blocks"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith(U + "input_blocks.5.")}, "UNet", "same number"),
    (lambda t: {k: v for k, v in t.items() if k != U + "time_embed.0.weight"}, "UNet", "no time_embed.0.weight"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith(U + "input_blocks.2.1.")}, "UNet", "attention in some"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith(V + "encoder.down.1.block.1.")}, "VAE", "same number"),
    (lambda t: widened(t, "cond_stage_model.model.token_embedding.weight", dim=1), "text encoder",
     "width 224 does not split into 64-wide heads"),
], ids=["wider-res-block", "level-short-of-a-res-block", "no-time-embedding", "attention-in-one-res-block",
        "vae-level-short-of-a-res-block", "text-width"])
def test_incomprehensible_part_is_named(sd2_tensors, tmp_path, damage, part, detail):
    save_file(damage(sd2_tensors), tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "bad.safetensors")
    message = one_sentence(e)
    assert f"the {part}'s architecture cannot be read" in message and detail in message, message


def test_channels_that_do_not_split_into_the_versions_heads():
    # SD 2.x heads are 64 wide: a UNet whose attention runs over 96 channels cannot be SD 2-style.
    with torch.device("meta"):
        unet = un.UNet(un.UNetConfig(model_channels=96, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                                     num_heads=0, head_dim=32, context_dim=64, linear_proj=True)).state_dict()
    with pytest.raises(ModelFileError) as e:
        detect.unet_config(unet, "SD 2.x", "epsilon", "f.safetensors")
    assert "attention over 96 channels does not split into SD 2.x's 64-wide heads" in one_sentence(e)
    assert detect.unet_config(unet, "SD 1.x", "epsilon", "f").num_heads == 8  # 96 / 8: fine for SD 1.x
