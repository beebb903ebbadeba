"""minidb's kohya LoRA files in AUTOMATIC1111 and ComfyUI, at the real sizes of SD 1.5, SD 2 and SDXL.

Neither tool installs as a library, so their rules for kohya's names are ported here from their sources
(the files and functions named beside each rule), and each name minidb writes must land on a layer of the
model as that tool builds it from the single file minidb writes: both patch every adapter. On the meta
device: every module, no memory. (diffusers reads the same files in test_lora.py.)"""

import re
import types

import pytest
import torch

from minidb import text_encoder as te, unet as un, vae as va
from minidb.lora import LoRA
from minidb.save import single_file_tensors
from test_lora import KOHYA_PARTS


@pytest.fixture(scope="module", params=["SD 1.x", "SD 2.x", "SDXL"])
def real_size(request):
    """(model, its LoRA with text encoders, {adapter name: (O, I, *kernel) of the weight it updates})."""
    xl = request.param == "SDXL"
    with torch.device("meta"):
        model = types.SimpleNamespace(
            unet=un.UNet({"SD 1.x": un.SD1, "SD 2.x": un.SD2, "SDXL": un.SDXL}[request.param]),
            text_encoder=te.TextEncoder({"SD 1.x": te.SD1, "SD 2.x": te.SD2, "SDXL": te.SDXL_L}[request.param]),
            text_encoder_2=te.TextEncoder(te.SDXL_G) if xl else None, vae=va.AutoencoderKL(va.SDXL if xl else va.SD),
            version=request.param, prediction_type="epsilon")
        lora = LoRA(model, rank=4, text_encoder=True)
    shapes = {name: (a.lora_up.weight.shape[0], *a.lora_down.weight.shape[1:]) for name, a in lora.named_children()}
    return model, lora, shapes


def a1111_modules(model):
    """{A1111's name for a module: (its kind, its weight's shape)} of `model` as A1111 builds it from minidb's
    single file. extensions-builtin/Lora/networks.py, assign_network_names_to_compvis_modules: every module of
    `sd_model.model` (the UNet is its `diffusion_model`), of SD 1/2's `cond_stage_model.wrapped` (CLIP's
    `transformer`, OpenCLIP's `model`: modules/sd_hijack_open_clip.py) and, for SDXL, of embedder i's `wrapped`
    with "{i}_" in front; "." -> "_". The modules' names are the file's keys; OpenCLIP's q, k and v are one
    `attn.in_proj_weight` of the nn.MultiheadAttention `attn`, whose `out_proj` is a Linear of its own."""
    modules = {}
    for key, t in single_file_tensors(model).items():
        rest = next((new + key[len(old):] for old, new in (("model.", ""), ("cond_stage_model.", ""),
                    ("conditioner.embedders.0.", "0_"), ("conditioner.embedders.1.", "1_")) if key.startswith(old)), None)
        if rest is None or not rest.endswith("weight"):  # the VAE (first_stage_model.*), which no LoRA patches
            continue
        path, _, leaf = rest.rpartition(".")
        parts = path.split(".")
        for i in range(1, len(parts)):  # named_modules() names every module above it too
            modules.setdefault("_".join(parts[:i]), ("container", None))
        modules["_".join(parts)] = ("MultiheadAttention" if leaf == "in_proj_weight" else "layer", tuple(t.shape))
    return modules


def a1111_compvis_name(key, is_sd2):
    """networks.py, convert_diffusers_name_to_compvis: diffusers' block names (SD 1/2 kohya files) -> the
    original's, 3 input blocks per level; OpenCLIP's layer names for SD 2's text encoder and SDXL's second."""
    inner = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
             "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}  # its suffix_conversion["resnets"]

    def at(kind, rest):  # an attention block is a block's second module; a res block its first, its leaves renamed
        return f"1_{rest}" if kind == "attentions" else f"0_{inner.get(rest, rest)}"

    def openclip(rest):  # it replaces the first of these that the name holds; a name holds only one
        return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")

    rules = [(r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
             (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
             (r"lora_unet_time_embedding_linear_(\d+)(.*)",
              lambda m: f"diffusion_model_time_embed_{2 * int(m[1]) - 2}{m[2]}"),
             (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
              lambda m: f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{at(m[2], m[4])}"),
             (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
              lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
                        f"{inner.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
             (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
              lambda m: f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_{at(m[2], m[4])}"),
             (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
              lambda m: f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"),
             (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
              lambda m: f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
             (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
              lambda m: f"model_transformer_resblocks_{m[1]}_{openclip(m[2])}" if is_sd2
              else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
             (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
              lambda m: f"1_model_transformer_resblocks_{m[1]}_{openclip(m[2])}")]
    return next((rename(m) for pattern, rename in rules if (m := re.match(pattern, key))), key)


def a1111_key(name, modules):
    """networks.py, load_network: (the key A1111 files adapter `name` under, the module it found for it, or None).
    After the rename: q/k/v_proj on OpenCLIP's MultiheadAttention (re_x_proj); SDXL files, which already
    have the original names, with lora_unet -> diffusion_model and lora_te1_text_model -> 0_transformer_text_model."""
    key = a1111_compvis_name(name, is_sd2="model_transformer_resblocks" in modules)
    found = key if key in modules else None
    if found is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)) and m[1] in modules:
        found = m[1]
    if found is None and "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        found = key if key in modules else None
    elif found is None and "lora_te1_text_model" in name:
        for new in ("0_transformer_text_model", "transformer_text_model"):
            if found is None:
                key = name.replace("lora_te1_text_model", new)
                found = key if key in modules else None
    return key, found


def test_names_at_real_size_are_the_layers_a1111_patches(real_size):
    model, lora, shapes = real_size
    modules = a1111_modules(model)
    keys = {name: a1111_key(name, modules) for name in shapes}
    filed = {key for key, _ in keys.values()}
    for name, (key, found) in keys.items():
        assert found is not None, f"A1111 matches no module to {name} (it tried {key})"
        kind, shape = modules[found]
        attention = key.rsplit("_", 2)[0]  # OpenCLIP's ..._attn, for its q/k/v/out_proj
        if modules.get(attention, ("",))[0] == "MultiheadAttention":
            # networks.py, network_apply_weights: a MultiheadAttention takes its update only from all four
            # adapters, "_q_proj", "_k_proj", "_v_proj" and "_out_proj" after its name; q, k and v each update
            # a third of in_proj_weight, out_proj its own weight (its forward never runs out_proj's).
            four = {f"{attention}_{p}_proj" for p in ("q", "k", "v", "out")}
            assert found in (attention, key) and four <= filed, f"A1111 patches {attention} only with all of {four}"
            if kind == "MultiheadAttention":
                shape = (shape[0] // 3, shape[1])
        else:  # any other layer looks up its own name: A1111 found the module under the key it files
            assert kind == "layer" and key == found, name
        assert shapes[name] == shape, name  # up @ down is the layer's update
    # and as many as kohya's: "create LoRA for Text Encoder: 72 modules", "... U-Net: 192" (SD 1.5); SD 2's text
    # encoder has 23 layers of 6 (sd-scripts builds it with 23, library/model_util.py); SDXL: test_sdxl_train.py
    counts = {"SD 1.x": [192, 72], "SD 2.x": [192, 23 * 6], "SDXL": [722, 72 + 192]}[model.version]
    assert [sum(n.startswith("lora_unet_") == unet for n in shapes) for unet in (True, False)] == counts


def comfyui_weights(model):
    """{weight key: shape} of `model` as ComfyUI loads minidb's single file: the UNet under `diffusion_model.`
    (model_base.py BaseModel), the text encoders renamed by comfy/supported_models.py process_clip_state_dict
    (SD15: cond_stage_model. -> clip_l.; SD20: cond_stage_model.model. -> clip_h.; SDXL:
    conditioner.embedders.0.transformer.text_model -> clip_l.transformer.text_model, embedders.1.model. -> clip_g.)
    and OpenCLIP's towers into transformers' names (comfy/utils.py clip_text_transformers_convert and
    transformers_convert: resblocks.N -> text_model.encoder.layers.N, the renames below, q, k and v the
    thirds of in_proj)."""
    renames = [("model.diffusion_model.", "diffusion_model."), ("cond_stage_model.model.", "clip_h."),
               ("cond_stage_model.", "clip_l."), ("conditioner.embedders.1.model.", "clip_g."),
               ("conditioner.embedders.0.transformer.text_model", "clip_l.transformer.text_model")]
    layer = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}  # transformers_convert's resblock_to_replace
    weights = {}
    for key, t in single_file_tensors(model).items():
        key = next((new + key[len(old):] for old, new in renames if key.startswith(old)), None)
        m = re.fullmatch(r"(clip_[hg]\.)transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key or "")
        into = m and f"{m[1]}transformer.text_model.encoder.layers.{m[2]}."
        if m and m[3] == "attn.in_proj":
            weights.update({f"{into}self_attn.{p}_proj.{m[4]}": (t.shape[0] // 3, *t.shape[1:]) for p in "qkv"})
        elif m and m[3] in layer:
            weights[f"{into}{layer[m[3]]}.{m[4]}"] = tuple(t.shape)
        elif key is not None:
            weights[key] = tuple(t.shape)
    return weights


def comfyui_unet_to_diffusers(cfg):
    """comfy/utils.py, unet_to_diffusers: {diffusers weight: original weight} for a UNet's blocks, counting them
    from its unet_config (here as model_detection.py detect_unet_config reads it off the file: per level the
    res blocks and the transformer depth of each input and each output block)."""
    levels = range(len(cfg.channel_mult))
    depth = [cfg.depth_at(level) if level in cfg.attention_levels else 0 for level in levels]
    depth_in = [d for d in depth for _ in range(cfg.num_res_blocks)]
    depth_out = [d for d in depth for _ in range(cfg.num_res_blocks + 1)]  # detect_unet_config's order: popped
    # from the end, the lowest level's first
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
              "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # UNET_MAP_RESNET
    attention = ["proj_in", "proj_out", "norm"]  # UNET_MAP_ATTENTIONS
    block = [f"{a}.{w}" for a in ("attn1", "attn2") for w in ("to_q", "to_k", "to_v", "to_out.0")] + [
        "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"]  # TRANSFORMER_BLOCKS

    def transformer(diffusers, original, blocks):
        pairs = [(f"{diffusers}.{a}", f"{original}.{a}") for a in attention]
        return pairs + [(f"{diffusers}.transformer_blocks.{t}.{b}", f"{original}.transformer_blocks.{t}.{b}")
                        for t in range(blocks) for b in block]

    pairs = []
    for x in levels:
        n = 1 + (cfg.num_res_blocks + 1) * x
        for i in range(cfg.num_res_blocks):
            pairs += [(f"down_blocks.{x}.resnets.{i}.{d}", f"input_blocks.{n}.0.{o}") for o, d in resnet.items()]
            if (blocks := depth_in.pop(0)) > 0:
                pairs += transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", blocks)
            n += 1
        pairs.append((f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
    pairs += transformer("mid_block.attentions.0", "middle_block.1", cfg.transformer_depth_middle)
    pairs += [(f"mid_block.resnets.{i}.{d}", f"middle_block.{n}.{o}")
              for i, n in enumerate([0, 2]) for o, d in resnet.items()]
    for x in levels:
        n = (cfg.num_res_blocks + 1) * x
        for i in range(cfg.num_res_blocks + 1):
            pairs += [(f"up_blocks.{x}.resnets.{i}.{d}", f"output_blocks.{n}.0.{o}") for o, d in resnet.items()]
            c = 1
            if (blocks := depth_out.pop()) > 0:
                c = 2
                pairs += transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", blocks)
            if i == cfg.num_res_blocks:
                pairs.append((f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{c}.conv"))
            n += 1
    pairs += [("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
              ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
              ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]  # UNET_MAP_BASIC
    return {d + ".weight": o + ".weight" for d, o in pairs}


def comfyui_key_map(weights, unet_cfg):
    """comfy/lora.py: {LoRA layer name: the model weight it patches}, kohya's names only."""
    key_map = {}
    # model_lora_keys_unet: each diffusion_model.<path>.weight as lora_unet_<path, "." -> "_"> (SDXL files' names),
    # and each of unet_to_diffusers' diffusers names as lora_unet_<name> (SD 1/2 files' names)
    for k in weights:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")] = k
    for d, o in comfyui_unet_to_diffusers(unet_cfg).items():
        key_map["lora_unet_" + d.removesuffix(".weight").replace(".", "_")] = "diffusion_model." + o
    # model_lora_keys_clip: for layers b < 32 and LORA_CLIP_MAP's six Linears, the weight of each tower present:
    # clip_h (SD 2) as lora_te_ and lora_te1_; clip_l as lora_te_ and lora_te1_; clip_g as lora_te2_ once clip_l was
    # seen (SDXL base), else as lora_te_ (the refiner)
    clip = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
            "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
            "self_attn.out_proj": "self_attn_out_proj"}
    clip_l_present = False
    for b in range(32):
        for c, lora_c in clip.items():
            for tower in ("clip_h", "clip_l", "clip_g"):
                k = f"{tower}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k in weights:
                    clip_l_present |= tower == "clip_l"
                    prefixes = (["lora_te_", "lora_te1_"] if tower != "clip_g" else ["lora_te2_"] if clip_l_present
                                else ["lora_te_"])
                    key_map.update({f"{p}text_model_encoder_layers_{b}_{lora_c}": k for p in prefixes})
    return key_map


def test_names_at_real_size_are_the_weights_comfyui_patches(real_size):
    model, lora, shapes = real_size
    weights = comfyui_weights(model)
    key_map = comfyui_key_map(weights, model.unet.cfg)
    # comfy/lora.py load_lora: for each key_map name x with "x.lora_up.weight" in the file it takes that,
    # x.lora_down.weight and x.alpha, and patches key_map[x]; a file key it took for nothing it reports as
    # "lora key not loaded".
    file_keys = set(lora.state_dict())
    taken = {f"{x}.{part}" for x in key_map if f"{x}.lora_up.weight" in file_keys for part in KOHYA_PARTS}
    assert file_keys <= taken, f"ComfyUI leaves out {sorted(file_keys - taken)[:5]}"
    for name, shape in shapes.items():  # the patch lands on a weight of the model, of the shape of up @ down
        assert weights.get(key_map[name]) == shape, f"{name} -> {key_map[name]}"
