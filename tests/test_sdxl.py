"""Stable Diffusion XL: minidb's model stack against diffusers and transformers, at tiny SDXL-shaped
configs (the same code paths: no attention in the first level, deep transformers, the added
conditioning of pooled text and image sizes) and, for shapes, at the real published config."""

import dataclasses

import pytest
import torch

from conftest import assert_close, diffusers, diffusers_unet, randomize_, text_twin, transformers, twin, unet_twin
from minidb import text_encoder as te, unet as un, vae as va
from minidb.convert import (native_to_diffusers_names, text_config_from_transformers, text_config_to_transformers,
                            unet_blocks, unet_config_from_diffusers, vae_config_from_diffusers,
                            vae_config_to_diffusers)
from minidb.tokenizer import Tokenizer

# huggingface.co/stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (JSON true/false/null ->
# True/False/None); checked against copies quoted in public code (diffusers' single-file test fixtures,
# nunchaku's SDXL configs).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# Tiny, SDXL-shaped: three levels, none in the first, depths 2 and 3, head dim 16, a 48-wide context
# (two text encoders side by side), pooled text 16 wide plus the six 256-wide size features.
TINY_SDXL_UNET = dataclasses.replace(un.TINY, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                                     num_heads=0, head_dim=16, context_dim=48, linear_proj=True,
                                     transformer_depth=(0, 2, 3), transformer_depth_middle=3,
                                     adm_in_channels=16 + 6 * un.SIZE_FEATURES)


def test_published_config_translates_to_the_preset():
    assert unet_config_from_diffusers(SDXL_UNET) == un.SDXL
    assert [un.SDXL.heads_for(320 * m) for m in (2, 4)] == [(10, 64), (20, 64)]  # SDXL: head dim 64


def test_the_preset_has_every_tensor_of_diffusers_sdxl_unet_in_its_shape():
    with torch.device("meta"):
        ours = un.UNet(un.SDXL).state_dict()
        theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if not k.startswith("_")})
    theirs = theirs.state_dict()
    names = native_to_diffusers_names(ours.keys(), unet_blocks(un.SDXL))
    assert sorted(names.values()) == sorted(theirs)
    assert all(ours[k].shape == theirs[d].shape for k, d in names.items())
    assert sum(t.numel() for t in ours.values()) == 2_567_463_684  # SDXL's UNet: 2.6 B parameters


def test_tiny_sdxl_unet_matches_diffusers_and_its_added_conditioning_matters():
    ref = diffusers_unet(TINY_SDXL_UNET)
    ours = unet_twin(ref, TINY_SDXL_UNET)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 48, generator=g), torch.randn(2, 16, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])  # sizes, crop, target
    t = torch.tensor([10, 900])
    with torch.no_grad():
        a = ours(x, t, ctx, torch.cat([pooled, un.size_features(time_ids)], dim=1))
        b = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        other = ours(x, t, ctx, torch.cat([pooled, un.size_features(time_ids.flip(0))], dim=1))
    assert_close(a, b)
    assert (a - other).abs().max() > 1e-3 * a.abs().max()  # the sizes change the prediction


# ---- the two text encoders ----

TINY_L = dataclasses.replace(te.TINY, skip_last=1, final_norm=False)  # CLIP-L's role: penultimate layer, no LN
TINY_G = dataclasses.replace(te.TINY, width=16, heads=2, layers=3, mlp_width=40, activation="gelu", skip_last=1,
                             final_norm=False, projection=16)  # bigG's: the same, plus the pooled vector


def reference_text(cfg, seed):
    kwargs = {k: v for k, v in text_config_to_transformers(cfg).items() if k not in ("architectures", "model_type")}
    cls = transformers.CLIPTextModelWithProjection if cfg.projection else transformers.CLIPTextModel
    return randomize_(cls(transformers.CLIPTextConfig(**kwargs)), seed)


@pytest.mark.parametrize("cfg,pad", [(TINY_L, 49407), (TINY_G, 0)], ids=["CLIP-L", "OpenCLIP-bigG"])
def test_text_encoders_match_transformers_at_the_penultimate_layer(cfg, pad):
    ref = reference_text(cfg, seed=3)
    ours = text_twin(ref, cfg) if not cfg.projection else twin(
        te.TextEncoder, cfg, {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()})
    tok = Tokenizer.for_version("SD 1.x" if pad else "SD 2.x")  # SDXL's second tokenizer pads with "!" (id 0)
    ids = tok(["a photo of sks dog", "wow! a cat on the beach"])
    assert (ids[:, -1] == pad).all()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        context = ours(ids, pooled=bool(cfg.projection))
    if cfg.projection:
        context, pooled = context
        assert_close(pooled, out.text_embeds)
    assert_close(context, out.hidden_states[-2])
    assert not torch.allclose(context, out.last_hidden_state)  # not the last layer, nor its LayerNorm


def test_text_configs_round_trip_through_transformers():
    for cfg in (te.SDXL_L, te.SDXL_G, te.SD1, te.SD2):
        back = text_config_from_transformers(text_config_to_transformers(cfg))
        assert back == dataclasses.replace(cfg, skip_last=0, final_norm=True)  # those are the pipeline's choice


def test_sdxl_vae_config_round_trips_with_its_own_latent_scale():
    assert va.SDXL.scale_factor == 0.13025 and va.SD.scale_factor == 0.18215
    exported = vae_config_to_diffusers(va.SDXL, 1024)
    assert exported["scaling_factor"] == 0.13025
    assert vae_config_from_diffusers({**exported, "force_upcast": True}) == va.SDXL
    ref = diffusers.AutoencoderKL(**{k: v for k, v in vae_config_to_diffusers(va.TINY, 64).items() if k != "_class_name"})
    assert ref.config.scaling_factor == va.TINY.scale_factor
