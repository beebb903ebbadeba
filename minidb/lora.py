"""LoRA (Hu et al. 2021, arXiv 2106.09685): DreamBooth that trains small low-rank updates, in the files
that AUTOMATIC1111, ComfyUI, kohya's scripts and diffusers read as they are.

A LoRA leaves a layer y = W x + b frozen and adds (alpha / rank) * up(down(x)), where `down` maps the
layer's input to `rank` channels (4 to 128) and `up` maps them back. `up` starts at zero, so training
starts from the base model exactly. Afterwards W + (alpha / rank) * up @ down can be merged into the
weights: sampling then costs nothing extra.

Names. The format people exchange is kohya's (sd-scripts, networks/lora.py): one adapter per layer,
holding `lora_down.weight`, `lora_up.weight` and `alpha`, named
    lora_unet_<diffusers module path, "." -> "_">   lora_unet_down_blocks_0_attentions_0_proj_in
    lora_te_text_model_<transformers module path>   lora_te_text_model_encoder_layers_0_mlp_fc1
minidb's UNet carries the original CompVis names (input_blocks.1.1.proj_in), so `naming()` derives
the table from minidb/convert.py's block table. For SDXL kohya builds its own UNet with the original
names (sd-scripts' sdxl_original_unet.py), and names its two text towers apart:
    lora_unet_<original module path>                lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    lora_te1_text_model_... (CLIP-L), lora_te2_text_model_... (OpenCLIP-bigG)
Other tools name the same layers in other ways, and `read_lora` takes each of them:
    lora_unet_input_blocks_1_1_proj_in.lora_down.weight         ComfyUI: the original path
    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight        diffusers / PEFT: lora_A down, lora_B up
    text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight   (text_model. only before transformers 5;
                                                                      SDXL's second: text_encoder_2.)
    unet.<path>.lora.down.weight, <path>.processor.to_q_lora.down.weight,
    text_encoder.<path>.lora_linear_layer.down.weight               older diffusers files
diffusers keeps alpha in the file's metadata (`lora_adapter_metadata`: lora_alpha, alpha_pattern, as
PEFT's LoraConfig) rather than in `alpha` tensors; with neither, alpha = rank.

Legend: r rank, O/I a layer's output/input channels, k its kernel size.
"""

import json
import math
import re

import torch
import torch.nn as nn

from minidb.convert import native_to_diffusers_names, unet_blocks
from minidb.files import ModelFileError, read_tensors, write_safetensors
from minidb.unet import SpatialTransformer

UNET = "lora_unet_"


def text_parts(model):
    """{text tower: kohya's prefix}: SD 1.x / 2.x have one text encoder, SDXL two."""
    if getattr(model, "text_encoder_2", None) is None:
        return {"text_encoder": "lora_te_"}
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def naming(model):
    """{kohya name: (part, minidb module name, diffusers / transformers module path)} for every Linear
    and Conv2d of the UNet and the text encoders' layers: the rule files use to name a LoRA's layers."""
    table, sdxl = {}, getattr(model, "text_encoder_2", None) is not None
    layers = [n for n, m in model.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    paths = native_to_diffusers_names([n + ".weight" for n in layers], unet_blocks(model.unet.cfg))
    for name in layers:
        path = paths[name + ".weight"].removesuffix(".weight")  # input_blocks.1.1 -> down_blocks.0.attentions.0
        table[UNET + (name if sdxl else path).replace(".", "_")] = ("unet", name, path)
    for part, prefix in text_parts(model).items():
        for name, m in getattr(model, part).named_modules():
            if isinstance(m, nn.Linear) and name.startswith("encoder."):  # transformers 4's CLIPTextModel, which
                # kohya names, wraps all in text_model
                table[prefix + "text_model_" + name.replace(".", "_")] = (part, name, "text_model." + name)
    return table


def _kohya_targets(model, text_encoder):
    """kohya's default LoRA (no conv_dim): every Linear and 1x1 Conv2d inside the UNet's
    SpatialTransformers (its Transformer2DModel), and every Linear of the CLIP layers."""
    inside = tuple(n + "." for n, m in model.unet.named_modules() if isinstance(m, SpatialTransformer))
    for kohya, (part, name, _) in naming(model).items():
        layer = getattr(model, part).get_submodule(name)
        if part == "unet" and name.startswith(inside) and (isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)):
            yield kohya, layer
        elif part != "unet" and text_encoder and name.startswith("encoder.layers."):
            yield kohya, layer


class Adapter(nn.Module):
    """One layer's update (alpha / rank) * up(down(x)), laid out as kohya's LoRAModule."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        if isinstance(base, nn.Conv2d):  # down takes the layer's kernel, up is 1x1
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's init (PyTorch's Linear default)
        nn.init.zeros_(self.lora_up.weight)  # so that step 0 is the base model
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, x):  # the scale applied to the rank-wide middle, the smallest tensor on the way
        return self.lora_up(self.lora_down(x) * (self.alpha / self.lora_down.weight.shape[0]))


def _add_update(adapter):
    def hook(layer, args, output):  # a forward hook's return value replaces the layer's output
        x = args[0]
        if not torch.is_autocast_enabled(x.device.type):  # an fp16 model, fp32 adapters (under autocast the
            x = x.to(adapter.lora_down.weight.dtype)      # adapter's matmuls cast for themselves: no fp32 copy)
        return output + adapter(x).to(output.dtype)
    return hook


class LoRA(nn.Module):
    """Low-rank adapters W + (alpha/rank) * up @ down on a StableDiffusion model's modules.

    Targets, as kohya's default LoRA (sd-scripts networks/lora.py without conv_dim): every Linear and
    1x1 Conv2d inside the UNet's SpatialTransformers (proj_in, proj_out, attn1/attn2 to_q, to_k, to_v,
    to_out.0, ff.net.0.proj, ff.net.2); with text_encoder=True also each CLIP layer's self_attn q_proj,
    k_proj, v_proj, out_proj and mlp fc1, fc2 (in both of SDXL's text encoders). Each adapter is a
    submodule named as kohya names it, so `state_dict()` keys are the file's keys. alpha None means
    alpha = rank (scale 1). The adapters are fp32 on the model's device, trainable; the model itself
    is left as it is.
    """

    def __init__(self, model, rank=16, alpha=None, text_encoder=False):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"The LoRA rank must be a positive whole number, not {rank!r}.")
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.version, self.prediction_type = model.version, model.prediction_type
        self.bases = {}  # kohya name -> the layer it adapts; a plain dict, so not part of the LoRA's state
        for kohya, layer in _kohya_targets(model, text_encoder):
            self.add_module(kohya, Adapter(layer, rank, self.alpha).to(layer.weight.device))
            self.bases[kohya] = layer
        self.handles = []

    def attach(self):
        """Add each adapter's update to its layer's output: forward hooks, which autocast casts like any
        layer, and which run again when torch.utils.checkpoint recomputes a block."""
        self.detach()
        self.handles = [self.bases[k].register_forward_hook(_add_update(a)) for k, a in self.named_children()]
        return self

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self


def save_kohya(lora, path, metadata=None, dtype=torch.float16):
    """Write `lora` as kohya's .safetensors, with the ss_* metadata A1111 and Forge read (ss_v2 tells
    them SD 2.x; ss_base_model_version as kohya spells it: get_model_version_str_for_sd1_sd2, and
    sdxl_model_util's "sdxl_base_v1-0")."""
    version = {"SDXL": "sdxl_base_v1-0", "SD 2.x": "sd_v2"}.get(lora.version, "sd_v1")
    if lora.version != "SDXL" and lora.prediction_type == "v_prediction":
        version += "_v"
    info = {k: str(v) for k, v in (metadata or {}).items()}
    info.update({"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
                 "ss_network_alpha": str(lora.alpha), "ss_base_model_version": version,
                 "ss_v2": str(lora.version == "SD 2.x")})
    write_safetensors(path, {k: t.to(dtype) for k, t in lora.state_dict().items()}, metadata=info)


# ---- reading the files people have ----

# (end of a key, what it holds); the part before it names the layer. Mutually exclusive endings.
SUFFIXES = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),  # kohya
            (".lora_A.weight", "down"), (".lora_B.weight", "up"),  # PEFT, diffusers
            (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # older diffusers ...
            (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
            ("_lora.down.weight", "down"), ("_lora.up.weight", "up")]  # ... attention processors: to_q_lora
# Other adapter kinds (LyCORIS, DoRA): an update that is not up @ down.
OTHER_KINDS = {"hada_w": "LoHa", "lokr_w": "LoKr", "lora_mid": "Tucker-decomposed LoCon", "dora_scale": "DoRA",
               "lora_magnitude_vector": "DoRA", "oft_": "OFT", "diff": "full-difference", "diff_b": "full-difference"}
FULL_MODEL = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conv_in.", "encoder.conv_in.")


def _split(key):
    """'<layer>.lora_down.weight' -> ('<layer>', 'down'); None for keys of no LoRA layout."""
    for end, role in SUFFIXES:
        if key.endswith(end):
            name = key[: -len(end)]
            if end.startswith("_lora"):  # x.attn1.processor.to_out -> x.attn1.to_out.0; CLIP: to_q -> q_proj
                name = name.replace(".processor.", ".")
                name = re.sub(r"self_attn\.to_(q|k|v|out)$", r"self_attn.\1_proj", name)
                name = re.sub(r"\.to_out$", ".to_out.0", name)
            return name, role
    return None


def _aliases(model):
    """Every name a file may give a layer -> (part, minidb name, diffusers path)."""
    aliases = {}
    for kohya, (part, name, path) in naming(model).items():
        if part == "unet":  # kohya's SD and SDXL names (the original path's is ComfyUI's too), diffusers with and
            # without the unet. prefix
            names = [kohya, UNET + path.replace(".", "_"), UNET + name.replace(".", "_"), "unet." + path, path]
        else:  # text_encoder. or SDXL's text_encoder_2.
            names = [kohya, f"{part}.{path}", f"{part}.{name}"]
        aliases.update(dict.fromkeys(names, (part, name, path)))
    return aliases


def _made_for(tensors, metadata):
    """Which model family a LoRA was made for, from kohya's metadata or else its shapes; None if unsure."""
    version, v2 = metadata.get("ss_base_model_version", ""), metadata.get("ss_v2")
    for prefix, family in (("sdxl", "SDXL"), ("sd_v2", "SD 2.x"), ("sd_v1", "SD 1.x")):
        if version.startswith(prefix):
            return family
    if v2 in ("True", "False"):
        return "SD 2.x" if v2 == "True" else "SD 1.x"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in tensors):
        return "SDXL"
    context = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # the text width attn2's to_k / to_v read
    downs = [(split[0], t) for key, t in tensors.items() if (split := _split(key)) and split[1] == "down" and t.ndim >= 2]
    for name, t in downs:
        if re.search(r"attn2[._]to_[kv]$", name) and t.shape[1] in context:
            return context[t.shape[1]]
    if any(re.search(r"transformer_blocks[._][1-9]", name) for name, _ in downs):  # SD 1.x / 2.x: depth 1
        return "SDXL"
    for name, t in downs:
        if re.search(r"proj_(in|out)$", name):  # 1x1 convs in SD 1.x, Linear from SD 2.x on
            return "SD 1.x" if t.ndim == 4 else "SD 2.x"
    return None


def _check_family(path, model, tensors, metadata):
    """Refuse a LoRA that says, or whose shapes show, that it was made for another model family."""
    family = _made_for(tensors, metadata)
    if family and family != model.version:
        raise ModelFileError(f"{path} is a LoRA for {family}, but the model is {model.version}; "
                             f"apply it to an {family} model.")


def _fail(path, model, tensors, metadata, problem):
    """One sentence for a file that does not fit the model: the family if that is why, else `problem`."""
    _check_family(path, model, tensors, metadata)
    raise ModelFileError(f"{path} {problem}.")


def _first(items, n=3):
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _peft_scale(settings, part, name_in_file, rank):
    """alpha / rank as PEFT's LoraConfig in diffusers' metadata says, for one layer (alpha = rank if none)."""
    get = lambda key, default=None: settings.get(f"{part}.{key}", default)  # noqa: E731
    alpha = get("lora_alpha", rank)
    for pattern, value in (get("alpha_pattern") or {}).items():  # matched as PEFT's get_pattern_key does
        if re.match(rf"(.*\.)?({pattern})$", name_in_file):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return alpha / (math.sqrt(rank) if get("use_rslora") else rank)  # rsLoRA: alpha / sqrt(r)


def _read(path, model):
    """The file's adapters, each checked against its layer -> [(part, layer, down, up, alpha / rank)]."""
    tensors, metadata = read_tensors(path)
    if isinstance(tensors.get("state_dict"), dict):  # a training checkpoint
        tensors = tensors["state_dict"]
    tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not any(_split(k) and _split(k)[1] != "alpha" for k in tensors):
        if any(k.startswith(FULL_MODEL) for k in tensors):
            raise ModelFileError(f"{path} is a full model checkpoint, not a LoRA; load it as the base model instead.")
        raise ModelFileError(f"{path} holds no LoRA tensors (lora_down/lora_up or lora_A/lora_B), so it is not a LoRA.")
    for key in tensors:
        kind = re.search(r"\.(hada_w|lokr_w|lora_mid|dora_scale|lora_magnitude_vector|oft_|diff$|diff_b$)", key)
        if kind:
            raise ModelFileError(f"{path} is a {OTHER_KINDS[kind[1]]} adapter ({key}), which minidb does not read; "
                                 "it reads plain LoRA and LoCon files.")
    _check_family(path, model, {}, metadata)  # what kohya's metadata says

    aliases, layers, unknown = _aliases(model), {}, []
    for key in sorted(tensors):
        split = _split(key)
        layer = aliases.get(split[0]) if split else None
        if layer is None:
            unknown.append(key)
            continue
        held = layers.setdefault(layer, {})
        if split[1] in held:
            _fail(path, model, tensors, metadata, f"names the layer {layer[2]} twice ({held[split[1]][0]} and {key})")
        held[split[1]] = (key, split[0])
    if unknown:
        _fail(path, model, tensors, metadata, f"has {len(unknown)} tensor{'s' * (len(unknown) > 1)} matching "
              f"no layer of this {model.version} model ({_first(unknown)}); it was made for another model, or by a "
              "tool whose names minidb does not know")
    settings, adapters = _peft_settings(path, metadata), []
    for (part, name, ref), held in layers.items():
        if "down" not in held or "up" not in held:
            has, lacks = ("down", "up") if "down" in held else ("up" if "up" in held else "alpha", "down")
            _fail(path, model, tensors, metadata, f"has {held[has][0]} without its {lacks} weight, so the file is incomplete")
        layer = getattr(model, part).get_submodule(name)
        (down_key, name_in_file), (up_key, _) = held["down"], held["up"]
        down, up, w = tensors[down_key], tensors[up_key], layer.weight
        rank = down.shape[0] if down.ndim else 0
        kernel = (1, 1) if w.ndim == 4 else ()  # a conv's up is 1x1; its down has the layer's kernel
        if rank == 0 or down.shape != (rank, *w.shape[1:]) or up.shape != (w.shape[0], rank, *kernel):
            _fail(path, model, tensors, metadata, f"has {down_key} of shape {tuple(down.shape)} and {up_key} of "
                  f"shape {tuple(up.shape)}, which do not fit the layer {ref} of shape {tuple(w.shape)}")
        if "alpha" in held:
            alpha_key = held["alpha"][0]
            if tensors[alpha_key].numel() != 1:
                _fail(path, model, tensors, metadata, f"has {alpha_key} of shape {tuple(tensors[alpha_key].shape)} "
                      "where one number belongs")
            scale = tensors[alpha_key].item() / rank
        else:
            scale = _peft_scale(settings, part, name_in_file.removeprefix(f"{part}."), rank)
            if scale is None:
                _fail(path, model, tensors, metadata, f"has lora_adapter_metadata whose {part} lora_alpha for "
                      f"{name_in_file} is not a number")
        adapters.append((part, layer, down, up, scale))
    return adapters


def _peft_settings(path, metadata):
    """diffusers' `lora_adapter_metadata`: a JSON object of LoraConfig fields prefixed with unet. / text_encoder."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise ModelFileError(f"{path} has lora_adapter_metadata that is not a JSON object of LoRA settings; "
                             "the file is damaged, so download or export it again.")
    return settings


def _delta(layer, down, up, scale):
    """The layer's fp32 weight update: (O, r) @ (r, I*k*k) -> (O, I[, k, k]), times alpha / rank."""
    w = layer.weight
    up, down = (t.to(device=w.device, dtype=torch.float32) for t in (up, down))
    return (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale


def read_lora(path, model):
    """A LoRA file -> [(layer, fp32 weight update at scale 1)], strictly: every tensor must find its layer
    with fitting shapes, or one sentence (ModelFileError) says what does not."""
    return [(layer, _delta(layer, down, up, scale)) for _, layer, down, up, scale in _read(path, model)]


def merge_lora(model, path, scale=1.0):
    """W += scale * update for every layer the LoRA file adapts, in fp32, cast back to the layer's dtype.
    The model then samples exactly as fast as without. Returns {part: number of layers merged}, the parts
    being unet, text_encoder and SDXL's text_encoder_2."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"The LoRA scale must be a finite number, not {scale!r}.")
    adapters = _read(path, model)  # everything is checked before any weight changes
    merged = dict.fromkeys(["unet", *text_parts(model)], 0)
    with torch.no_grad():
        for part, layer, down, up, s in adapters:  # one update in memory at a time
            w = layer.weight
            w.copy_((w.float() + scale * _delta(layer, down, up, s)).to(w.dtype))
            merged[part] += 1
    return merged
