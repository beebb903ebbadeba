"""Rename rules between minidb's native names and the other public layouts.

minidb's modules are named as the original CompVis/Stability checkpoints name them (UNet, VAE) and
as transformers names CLIP (text encoder). Two other layouts exist on users' disks:

- diffusers folders name the UNet and VAE blocks by role (down_blocks.1.resnets.0) instead of by
  position (input_blocks.4.0). The map is a short table of block prefixes, derived from the config
  with the same loops that build the model, plus a few renames inside a res block or attention block.
- SD 2 single files store the text encoder, and SDXL single files their second one (bigG), in
  OpenCLIP's names, with q, k and v stacked in one `in_proj_weight`.

Each map is computed from a config and used in both directions: loading and saving.
"""

import json
import re

import torch

from minidb.text_encoder import TextEncoderConfig
from minidb.unet import SIZE_FEATURES, UNetConfig
from minidb.vae import LATENT_SCALE, LATENT_SCALE_XL, VAEConfig

# Inside a UNet ResBlock: (native, diffusers). Native indices skip the parameterless SiLU/Dropout.
UNET_RESNET_LEAVES = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                      ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
VAE_RESNET_LEAVES = [("nin_shortcut", "conv_shortcut")]
VAE_ATTENTION_LEAVES = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def unet_blocks(cfg):
    """[(native prefix, diffusers prefix, leaf renames)] for every block of the UNet table."""
    blocks = [("time_embed.0", "time_embedding.linear_1", []), ("time_embed.2", "time_embedding.linear_2", []),
              ("input_blocks.0.0", "conv_in", []), ("out.0", "conv_norm_out", []), ("out.2", "conv_out", []),
              ("label_emb.0.0", "add_embedding.linear_1", []), ("label_emb.0.2", "add_embedding.linear_2", [])]
    levels = len(cfg.channel_mult)
    n = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", UNET_RESNET_LEAVES))
            blocks.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", []))
            n += 1
        if level != levels - 1:
            blocks.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", []))
            n += 1
    blocks += [("middle_block.0", "mid_block.resnets.0", UNET_RESNET_LEAVES),
               ("middle_block.1", "mid_block.attentions.0", []),
               ("middle_block.2", "mid_block.resnets.1", UNET_RESNET_LEAVES)]
    n = 0
    for i, level in enumerate(reversed(range(levels))):  # diffusers counts up_blocks from the bottom
        attn = level in cfg.attention_levels
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", UNET_RESNET_LEAVES))
            if attn:
                blocks.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", []))
            if level != 0 and j == cfg.num_res_blocks:  # the upsampler follows the last res block
                blocks.append((f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", []))
            n += 1
    return blocks


def vae_blocks(cfg):
    """[(native prefix, diffusers prefix, leaf renames)] for the VAE."""
    blocks = [("encoder.norm_out", "encoder.conv_norm_out", []), ("decoder.norm_out", "decoder.conv_norm_out", [])]
    levels = len(cfg.ch_mult)
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET_LEAVES),
                   (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION_LEAVES),
                   (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET_LEAVES)]
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET_LEAVES))
        blocks.append((f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", []))
        up = levels - 1 - i  # the decoder's up[i] is diffusers' up_blocks[levels-1-i]
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET_LEAVES))
        blocks.append((f"decoder.up.{i}.upsample", f"decoder.up_blocks.{up}.upsamplers.0", []))
    return blocks


def native_to_diffusers_names(native_keys, blocks):
    """{native key: diffusers key} for every key, using the longest matching block prefix."""
    table = {native: (diffusers, leaves) for native, diffusers, leaves in blocks}
    names = {}
    for key in native_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                diffusers, leaves = table[prefix]
                rest = ".".join(parts[cut:])
                for old, new in leaves:
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                names[key] = f"{diffusers}.{rest}"
                break
        else:
            names[key] = key  # same name in both layouts (e.g. quant_conv, decoder.conv_in)
    return names


def vae_attention_shape(key, tensor, to_diffusers):
    """The VAE's q/k/v/proj_out are 1x1 convs in the original layout and Linear layers in diffusers."""
    if not re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$|mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
        return tensor
    return tensor[:, :, 0, 0] if to_diffusers else tensor[:, :, None, None]  # (C, C, 1, 1) <-> (C, C)


# ---- OpenCLIP (SD 2 single files, under `cond_stage_model.model.`; SDXL's bigG, `conditioner.embedders.1.model.`) ----

OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}
# OpenCLIP's projection head (text_projection, used as x @ P) and its temperature (logit_scale). SD 2
# uses neither; SDXL uses the projection for bigG's pooled vector, stored as a (width, projection)
# matrix where a Linear layer holds its transpose (diffusers: convert_open_clip_checkpoint, `.T`).
OPENCLIP_HEAD = ("text_projection", "logit_scale")


def openclip_to_native(tensors, layers=None, projection=False):
    """OpenCLIP text-tower tensors -> (native tensors, names of unused tensors).

    Layers past `layers` are unused: SD 2 reads the penultimate layer, so the 24th never runs (None:
    all are used, as in SDXL's bigG, whose extra layers the strict loader would then report).
    With `projection` (SDXL's bigG) text_projection becomes the Linear `text_projection.weight`.
    """
    native, unused = {}, []
    for key, t in tensors.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key)
        if key in OPENCLIP_TOP:
            native[OPENCLIP_TOP[key]] = t
        elif key == "text_projection" and projection:
            native["text_projection.weight"] = t.t().contiguous()  # x @ P == Linear with weight P^T
        elif m and layers is not None and int(m[1]) >= layers or key in OPENCLIP_HEAD:
            unused.append(key)
        elif m and m[2] == "attn.in_proj":  # (3C, C) stacked as q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                native[f"encoder.layers.{m[1]}.self_attn.{name}.{m[3]}"] = part.clone()
        elif m and m[2] in OPENCLIP_LAYER:
            native[f"encoder.layers.{m[1]}.{OPENCLIP_LAYER[m[2]]}.{m[3]}"] = t
        else:
            native[key] = t  # unknown: left for the strict loader to report
    return native, unused


def native_to_openclip(native):
    """Inverse of openclip_to_native, for writing SD 2 and SDXL single files."""
    top = {v: k for k, v in OPENCLIP_TOP.items()}
    layer = {v: k for k, v in OPENCLIP_LAYER.items()}
    out = {}
    for key, t in native.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in top:
            out[top[key]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        elif m and m[2] == "self_attn.q_proj":
            qkv = [native[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(qkv, dim=0)
        elif m and m[2] in layer:
            out[f"transformer.resblocks.{m[1]}.{layer[m[2]]}.{m[3]}"] = t
    return out


# ---- diffusers / transformers config.json <-> minidb configs ----

# What a config entry must hold: (test, the words for an error message).
COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number")
COUNTS = (lambda v: isinstance(v, list) and len(v) > 0 and all(COUNT[0](x) for x in v),
          "a list of positive whole numbers")
COUNT_OR_COUNTS = (lambda v: COUNT[0](v) or COUNTS[0](v), "a positive whole number or a list of them")
FLAG = (lambda v: isinstance(v, bool), "true or false")
NAMES = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names")
NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
TEXT_ACTIVATIONS = ("quick_gelu", "gelu")  # the two that minidb/text_encoder.py implements


def entry(c, key, kind, default=KeyError):
    """c[key], or `default` if absent or null (diffusers reads null as "the default"); a wrong type raises
    a ValueError that names the entry. Without a default a missing entry raises KeyError(key)."""
    if c.get(key) is None and default is not KeyError:
        return default
    test, words = kind
    if not test(c[key]):
        shown = json.dumps(c[key])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f'"{key}" is {shown} where {words} belongs; fix the entry or get the folder again')
    return c[key]


UNSUPPORTED_UNET_OPTIONS = {  # option: the value SD 1.x / 2.x / SDXL use; anything else is another model
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "only_cross_attention": False, "dual_cross_attention": False,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
}


def unet_config_from_diffusers(c):
    odd = {k: c[k] for k, v in UNSUPPORTED_UNET_OPTIONS.items() if c.get(k, v) != v}
    if entry(c, "in_channels", COUNT, 4) != 4:
        odd["in_channels"] = c["in_channels"]  # 9: inpainting, 8: instruct-pix2pix, 5: depth
    added = c.get("addition_embed_type")  # SDXL: "text_time", pooled text + size features of 256
    if added is not None and (added != "text_time" or c.get("addition_time_embed_dim") != SIZE_FEATURES):
        odd.update(addition_embed_type=added, addition_time_embed_dim=c.get("addition_time_embed_dim"))
    if odd:
        raise ValueError(f"this UNet has options SD 1.x/2.x and SDXL never use ({odd}), so it is another kind of "
                         "model, which minidb does not support yet")
    chans = _level_channels(c)
    down = entry(c, "down_block_types", NAMES)
    if len(down) != len(chans):
        raise ValueError(f'"down_block_types" names {len(down)} blocks but "block_out_channels" {len(chans)}; '
                         "fix the entries or get the folder again")
    # diffusers' "attention_head_dim" counts heads; newer configs say so in "num_attention_heads" (null in most).
    heads = entry(c, "attention_head_dim" if c.get("num_attention_heads") is None else "num_attention_heads",
                  COUNT_OR_COUNTS)
    heads = [heads] * len(chans) if isinstance(heads, int) else list(heads)
    same_count = len(set(heads)) == 1
    depth = entry(c, "transformer_layers_per_block", COUNT_OR_COUNTS, 1)  # the middle block takes the last level's
    depth = [depth] * len(chans) if isinstance(depth, int) else list(depth)
    attention_levels = tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    return UNetConfig(
        transformer_depth=() if set(depth) == {1} else tuple(d if i in attention_levels else 0 for i, d in enumerate(depth)),
        transformer_depth_middle=depth[-1],
        adm_in_channels=entry(c, "projection_class_embeddings_input_dim", COUNT) if added else 0,
        in_channels=entry(c, "in_channels", COUNT, 4), out_channels=entry(c, "out_channels", COUNT, 4),
        model_channels=chans[0], channel_mult=tuple(ch // chans[0] for ch in chans),
        num_res_blocks=entry(c, "layers_per_block", COUNT),
        attention_levels=attention_levels,
        num_heads=heads[0] if same_count else 0, head_dim=0 if same_count else chans[0] // heads[0],
        context_dim=entry(c, "cross_attention_dim", COUNT),
        linear_proj=entry(c, "use_linear_projection", FLAG, False),
        upcast_attention=entry(c, "upcast_attention", FLAG, False), sample_size=entry(c, "sample_size", COUNT, 64))


def _level_channels(c):  # "block_out_channels": each level a multiple of the first
    chans = entry(c, "block_out_channels", COUNTS)
    if any(ch % chans[0] for ch in chans):
        raise ValueError(f'"block_out_channels" {chans} are not all multiples of the first; '
                         "fix the entry or get the folder again")
    return chans


def unet_config_to_diffusers(cfg):
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = [cfg.heads_for(ch)[0] for ch in chans]
    down = ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(len(chans))]
    up = ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(len(chans)))]
    return {"_class_name": "UNet2DConditionModel", "sample_size": cfg.sample_size, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "block_out_channels": chans, "layers_per_block": cfg.num_res_blocks,
            "down_block_types": down, "up_block_types": up, "cross_attention_dim": cfg.context_dim,
            "attention_head_dim": heads if cfg.head_dim else cfg.num_heads,
            "use_linear_projection": cfg.linear_proj, "upcast_attention": cfg.upcast_attention,
            "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
            **({"transformer_layers_per_block": [cfg.depth_at(i) or 1 for i in range(len(chans))]}
               if cfg.transformer_depth else {}),
            **({"addition_embed_type": "text_time", "addition_time_embed_dim": SIZE_FEATURES,
                "projection_class_embeddings_input_dim": cfg.adm_in_channels} if cfg.adm_in_channels else {})}


def vae_config_from_diffusers(c):
    scale = entry(c, "scaling_factor", NUMBER, LATENT_SCALE)
    if scale not in (LATENT_SCALE, LATENT_SCALE_XL) or c.get("latents_mean") is not None:
        raise ValueError(f"this VAE scales latents by {scale}, not SD's {LATENT_SCALE} or SDXL's {LATENT_SCALE_XL}, "
                         "so it belongs to another kind of model, which minidb does not support yet")
    chans = _level_channels(c)
    return VAEConfig(ch=chans[0], ch_mult=tuple(ch // chans[0] for ch in chans),
                     num_res_blocks=entry(c, "layers_per_block", COUNT),
                     z_channels=entry(c, "latent_channels", COUNT, 4), in_channels=entry(c, "in_channels", COUNT, 3),
                     scale_factor=scale, force_upcast=entry(c, "force_upcast", FLAG, True))


def vae_config_to_diffusers(cfg, sample_size):
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "latent_channels": cfg.z_channels, "norm_num_groups": 32, "act_fn": "silu",
            "sample_size": sample_size, "scaling_factor": cfg.scale_factor, "force_upcast": cfg.force_upcast}


def text_config_from_transformers(c):
    activation = c["hidden_act"]
    if activation not in TEXT_ACTIVATIONS:
        raise ValueError(f'"hidden_act" is {json.dumps(activation)}, but SD\'s text encoders use "quick_gelu" (SD 1.x) '
                         'or "gelu" (SD 2.x); fix the entry or get the folder again')
    projected = "CLIPTextModelWithProjection" in (entry(c, "architectures", NAMES, None) or [])  # SDXL's bigG
    return TextEncoderConfig(
        vocab_size=entry(c, "vocab_size", COUNT), max_length=entry(c, "max_position_embeddings", COUNT),
        width=entry(c, "hidden_size", COUNT), layers=entry(c, "num_hidden_layers", COUNT),
        heads=entry(c, "num_attention_heads", COUNT), mlp_width=entry(c, "intermediate_size", COUNT),
        activation=activation, projection=entry(c, "projection_dim", COUNT) if projected else 0)


def text_config_to_transformers(cfg):
    """(Which layer SDXL reads is the pipeline's choice, not the text model's: skip_last and
    final_norm are not in transformers' config.)"""
    architecture = "CLIPTextModelWithProjection" if cfg.projection else "CLIPTextModel"
    return {"architectures": [architecture], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_length, "hidden_size": cfg.width, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_width, "hidden_act": cfg.activation,
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
            "projection_dim": cfg.projection or cfg.width, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
            "initializer_range": 0.02}
