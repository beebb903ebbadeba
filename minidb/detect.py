"""What architecture a single file holds: read from minidb's metadata, or from the tensors themselves.

- Files minidb wrote carry their exact configs in the safetensors metadata entry "minidb" (see
  minidb/save.py). An entry that cannot be understood (not JSON, missing or unknown fields, wrong
  types, an unknown version or prediction type) stops loading with a ModelFileError. We do not fall
  back to the tensors: they do not record a minidb model's head count, training size or upcast
  switch, so a fallback could quietly load a different model.
- Every other file (the CompVis/Stability originals, and pruned, merged or smaller models made from
  them) is read from its tensor shapes, as ComfyUI does (comfy/model_detection.py, detect_unet_config):
    UNet   base channels from time_embed.0.weight; levels, res blocks per level, channel multipliers,
           the levels with attention and their transformer depth by walking input_blocks (SDXL: 0, 2,
           10), the middle block's depth; context width from attn2.to_k; Linear (SD 2, SDXL) or
           1x1-conv (SD 1) proj_in from its rank; SDXL's added-conditioning width from label_emb.0.0.
    VAE    channels, multipliers and res blocks by walking the encoder's levels; latent channels
           from decoder.conv_in.
    text   width and vocabulary from the token embedding, length from the position embedding,
           layers counted, MLP width from the first layer; SDXL's bigG projection from text_projection.
  What shapes cannot say follows the version's convention: SD 1.x attention has 8 heads, SD 2.x and
  SDXL 64-wide heads; CLIP text towers have 64-wide heads (ViT-L 768/12, ViT-H 1024/16, bigG
  1280/20); SD 2.x computes attention in fp32 as 2.1 needs; the training size is 512 px (latent 64),
  768 px (latent 96) for SD 2 v-prediction, 1024 px (latent 128) for SDXL; SDXL's latent scale is
  0.13025; SDXL reads both text towers at the penultimate layer without the final LayerNorm.
- is_sdxl tells SDXL apart before anything loads (train.py's defaults depend on it), from a folder's
  layout or a file's tensor names alone.
"""

import json
import re
from dataclasses import fields
from pathlib import Path

from minidb import hub, single_file, text_encoder as te, unet as un, vae as va
from minidb.convert import TEXT_ACTIVATIONS
from minidb.files import ModelFileError, json_loads, read_tensors, tensor_names

VERSIONS = ("SD 1.x", "SD 2.x", "SDXL")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---- files minidb wrote ----

def configs_from_metadata(text, version, path):
    """The "minidb" metadata entry -> ({part: config}, prediction type); SDXL's parts include "text_encoder_2"."""
    def unusable(problem):
        return ModelFileError(f"{path} carries minidb metadata that this minidb cannot use ({problem}); the file "
                              "is damaged or from another minidb version, so export the model again or update minidb.")
    try:
        saved = json_loads(text)
    except json.JSONDecodeError:
        raise unusable("it is not JSON") from None
    parts = {"unet": un.UNetConfig, "vae": va.VAEConfig, "text_encoder": te.TextEncoderConfig}
    if isinstance(saved, dict) and saved.get("version") == "SDXL":
        parts["text_encoder_2"] = te.TextEncoderConfig
    problem = _fields_problem(saved, ["version", "prediction_type", *parts], "the metadata")
    if problem:
        raise unusable(problem)
    if saved["version"] not in VERSIONS:
        raise unusable(f"version {json.dumps(saved['version'])} is not one of {VERSIONS}")
    if saved["version"] != version:
        raise unusable(f"it says {saved['version']}, but the text encoder is {version}'s")
    if saved["prediction_type"] not in PREDICTION_TYPES:
        raise unusable(f"prediction_type {json.dumps(saved['prediction_type'])} is not one of {PREDICTION_TYPES}")
    configs = {}
    for name, cls in parts.items():
        d = saved[name]
        if isinstance(d, dict):  # a file from before a field existed means that field's default
            d = {**{f.name: _json(f.default) for f in fields(cls) if f.name in ADDED_SINCE}, **d}
        problem = _fields_problem(d, [f.name for f in fields(cls)], f'"{name}"') or _types_problem(cls, d, name)
        if problem:
            raise unusable(problem)
        configs[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    return configs, saved["prediction_type"]


# Config fields added after minidb first wrote metadata (for SDXL); older files lack them.
ADDED_SINCE = {"transformer_depth", "transformer_depth_middle", "adm_in_channels", "scale_factor", "skip_last",
               "final_norm", "projection", "force_upcast"}


def _json(value):  # a default as JSON would hold it
    return list(value) if isinstance(value, tuple) else value


def _fields_problem(d, names, what):
    if not isinstance(d, dict):
        return f"{what} is a JSON {type(d).__name__}, not an object"
    unknown, missing = [k for k in d if k not in names], [k for k in names if k not in d]
    if unknown or missing:
        return f"{what} has " + " and ".join(f"{label} fields {', '.join(keys)}" for label, keys in
                                             (("unknown", unknown), ("no", missing)) if keys)
    return None


def _whole(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# A config field's type -> (test of its JSON value, the words for an error message).
FIELD_TYPES = {int: (_whole, "a whole number"), bool: (lambda v: isinstance(v, bool), "true or false"),
               float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number"),
               str: (lambda v: isinstance(v, str), "a string"),
               tuple: (lambda v: isinstance(v, list) and all(_whole(x) for x in v), "a list of whole numbers")}


# Whole-number fields where 0 means "none" or "unused"; every other size, channel, layer or head count
# is at least 1 (sample_size 0, say, would build a model that fails at its first convolution).
MAY_BE_ZERO = {"num_heads", "head_dim", "attention_levels", "transformer_depth", "transformer_depth_middle",
               "adm_in_channels", "skip_last", "projection"}


def _types_problem(cls, d, name):
    for f in fields(cls):
        test, words = FIELD_TYPES[f.type]
        value = d[f.name]
        if not test(value):
            return f"{name}.{f.name} is {json.dumps(value)}, not {words}"
        if f.type in (int, tuple) and f.name not in MAY_BE_ZERO and 0 in (value if f.type is tuple else [value]):
            return f"{name}.{f.name} is {json.dumps(value)}, but a size, channel, layer or head count cannot be 0"
    if cls is te.TextEncoderConfig and d["activation"] not in TEXT_ACTIVATIONS:
        return f"{name}.activation is {json.dumps(d['activation'])}, not one of {TEXT_ACTIVATIONS}"
    return None


# ---- everyone else's files: the architecture from tensor shapes ----

def _shape(tensors, key, ndim, part, path):
    t = tensors.get(key)
    if t is None or t.ndim != ndim:
        problem = f"it has no {key}" if t is None else f"{key} has shape {tuple(t.shape)}"
        raise _unreadable(path, part, problem)
    return t.shape


def _unreadable(path, part, problem):
    return ModelFileError(f"{path}: the {part}'s architecture cannot be read from its tensors ({problem}); the file "
                          "is damaged or not an SD 1.x / 2.x / XL-style model, which is what minidb can load.")


def _levels(widths, base, part, path):
    """widths: per level, each res block's output channels -> (res blocks per level, channel multipliers)."""
    if not widths[0] or len({len(level) for level in widths}) != 1 or any(len(set(level)) != 1 for level in widths):
        raise _unreadable(path, part, f"its levels do not each hold the same number of equally wide res blocks "
                                      f"(output channels by level: {widths})")
    chans = [level[0] for level in widths]
    if any(ch % base for ch in chans):
        raise _unreadable(path, part, f"its levels' {chans} channels are not multiples of the base {base}")
    return len(widths[0]), tuple(ch // base for ch in chans)


def _depth(tensors, block):
    """How many transformer blocks the SpatialTransformer at `block` holds (0: none there)."""
    n = 0
    while f"{block}.transformer_blocks.{n}.norm1.weight" in tensors:
        n += 1
    return n


def unet_config(tensors, version, prediction_type, path):
    """UNet tensors (no `model.diffusion_model.` prefix) -> UNetConfig."""
    part = "UNet"
    if "input_blocks.0.0.weight" not in tensors:  # the UNet's first conv, which single_file reads the kind from
        raise ModelFileError(f"{path} lacks the UNet tensor model.diffusion_model.input_blocks.0.0.weight, though it "
                             "holds other UNet tensors, so it is incomplete or damaged; download or export it again.")
    mc = _shape(tensors, "time_embed.0.weight", 2, part, path)[1]  # (4 mc, mc)
    # input_blocks.0 is conv_in; then per level N res blocks, each maybe with a SpatialTransformer
    # (`.1`) of some depth, and a Downsample (`.0.op`) after every level but the last.
    widths, depths, n = [[]], [[]], 1
    while True:
        if f"input_blocks.{n}.0.op.weight" in tensors:
            widths.append([])
            depths.append([])
        elif f"input_blocks.{n}.0.in_layers.2.weight" in tensors:
            widths[-1].append(_shape(tensors, f"input_blocks.{n}.0.in_layers.2.weight", 4, part, path)[0])
            depths[-1].append(_depth(tensors, f"input_blocks.{n}.1"))
        else:
            break
        n += 1
    num_res_blocks, channel_mult = _levels(widths, mc, part, path)
    if any(len({d > 0 for d in level}) != 1 for level in depths):
        raise _unreadable(path, part, "some of its levels have attention in some res blocks only")
    if any(len(set(level)) != 1 for level in depths):  # e.g. SSD-1B, a distilled SDXL
        raise _unreadable(path, part, f"some of its levels have transformers of different depths ({depths})")
    depth = [level[0] for level in depths]
    attention_levels = tuple(i for i, d in enumerate(depth) if d)
    middle = _depth(tensors, "middle_block.1")

    # The head layout is not in the tensors: SD 1.x has 8 heads at every level, SD 2.x and SDXL 64-wide heads.
    if version == "SD 1.x":
        heads, split, convention = {"num_heads": 8, "head_dim": 0}, 8, "8 heads"
    else:
        heads, split, convention = {"num_heads": 0, "head_dim": 64}, 64, "64-wide heads"
    attended = [mc * channel_mult[i] for i in attention_levels] + [mc * channel_mult[-1]]  # + the middle block
    odd = [ch for ch in attended if ch % split]
    if odd:
        raise _unreadable(path, part, f"attention over {odd[0]} channels does not split into {version}'s {convention}")
    proj_in = tensors.get("middle_block.1.proj_in.weight")
    return un.UNetConfig(
        in_channels=_shape(tensors, "input_blocks.0.0.weight", 4, part, path)[1],
        out_channels=_shape(tensors, "out.2.weight", 4, part, path)[0], model_channels=mc,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_levels=attention_levels, **heads,
        context_dim=_shape(tensors, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2, part, path)[1],
        linear_proj=proj_in is not None and proj_in.ndim == 2, upcast_attention=version == "SD 2.x",
        sample_size=SAMPLE_SIZES.get(version, 96 if prediction_type == "v_prediction" else 64),
        # one transformer block everywhere is SD 1/2's layout, written () (UNetConfig's default)
        transformer_depth=() if set(depth) <= {0, 1} and middle == 1 else tuple(depth), transformer_depth_middle=middle,
        # SDXL's added conditioning: pooled text + size features (label_emb.0.0 is (4 mc, adm_in_channels))
        adm_in_channels=_shape(tensors, "label_emb.0.0.weight", 2, part, path)[1] if version == "SDXL" else 0)


# The latent side a version was trained at when the tensors cannot say: SDXL 1024 px; SD 1.x/2.x 512
# px, or 768 px for SD 2 v-prediction (the 768-v models).
SAMPLE_SIZES = {"SDXL": 128}


def guess_prediction_type(version, tensors):
    if version != "SD 2.x":  # SD 1.x and SDXL base are ε (a v-prediction SDXL file says so: load.py)
        return "epsilon"
    # ComfyUI's heuristic (supported_models.py, SD20.model_type): v-prediction training leaves the
    # first LayerNorm bias of the last up block (SD 2: output_blocks.11) with a visibly larger
    # spread than ε training does. For other architectures it is a guess; prediction_type= overrides.
    last = max((int(m[1]) for k in tensors if (m := re.match(r"output_blocks\.(\d+)\.", k))), default=0)
    bias = tensors.get(f"output_blocks.{last}.1.transformer_blocks.0.norm1.bias")  # None: no attention there
    return "v_prediction" if bias is not None and bias.float().std(unbiased=False) > 0.09 else "epsilon"


def vae_config(tensors, path, version="SD 1.x"):
    """VAE tensors (no `first_stage_model.` prefix) -> VAEConfig, with the version's latent scale."""
    part = "VAE"
    ch, in_channels = _shape(tensors, "encoder.conv_in.weight", 4, part, path)[:2]  # (ch, 3, 3, 3)
    widths = []  # encoder.down.{level}.block.{j}: the res blocks of each level
    while f"encoder.down.{len(widths)}.block.0.conv1.weight" in tensors:
        i, level = len(widths), []
        while (key := f"encoder.down.{i}.block.{len(level)}.conv1.weight") in tensors:
            level.append(_shape(tensors, key, 4, part, path)[0])
        widths.append(level)
    num_res_blocks, ch_mult = _levels(widths or [[]], ch, part, path)
    return va.VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                        z_channels=_shape(tensors, "decoder.conv_in.weight", 4, part, path)[1],
                        in_channels=in_channels, scale_factor=va.LATENT_SCALE_XL if version == "SDXL" else va.LATENT_SCALE)


# Where each text tower keeps what we read: CLIP (SD 1, SDXL's first; transformers' names after
# `text_model.`) and OpenCLIP (SD 2, SDXL's second).
TEXT_KEYS = {"CLIP": ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                      "encoder.layers.{}.layer_norm1.weight", "encoder.layers.0.mlp.fc1.weight"),
             "OpenCLIP": ("token_embedding.weight", "positional_embedding",
                          "transformer.resblocks.{}.ln_1.weight", "transformer.resblocks.0.mlp.c_fc.weight")}


def text_config(tensors, version, path, second=False):
    """Text-tower tensors -> TextEncoderConfig: CLIP names for SD 1.x and SDXL's first tower, OpenCLIP
    names for SD 2.x and SDXL's second (`second`), OpenCLIP-bigG with its projection."""
    part = "second text encoder" if second else "text encoder"
    openclip = version == "SD 2.x" or second
    token, position, layer, fc1 = TEXT_KEYS["OpenCLIP" if openclip else "CLIP"]
    vocab, width = _shape(tensors, token, 2, part, path)
    layers = 0
    while layer.format(layers) in tensors:
        layers += 1
    if version == "SD 2.x":  # SD 2 reads the penultimate layer, so the last one never runs
        layers -= 1
    if layers < 1 or width % 64:
        problem = f"{layers} layers" if layers < 1 else f"width {width} does not split into 64-wide heads"
        raise _unreadable(path, part, problem)
    # SDXL reads both towers at the penultimate layer without the final LayerNorm, and bigG's pooled
    # vector through text_projection, stored as (width, projection) (minidb/convert.py).
    xl = {"skip_last": 1, "final_norm": False} if version == "SDXL" else {}
    if second:
        xl["projection"] = _shape(tensors, "text_projection", 2, part, path)[1]
    return te.TextEncoderConfig(vocab_size=vocab, max_length=_shape(tensors, position, 2, part, path)[0], width=width,
                                layers=layers, heads=width // 64, mlp_width=_shape(tensors, fc1, 2, part, path)[0],
                                activation="gelu" if openclip else "quick_gelu", **xl)


def is_sdxl(path):
    """Whether the base model is SDXL, found cheaply before it loads (SDXL changes --method's default), as
    minidb/load.py decides: a diffusers folder with text_encoder_2/, or a single file with SDXL's text keys.
    A Hub id is downloaded here (minidb/hub.py) and read as its folder. False when unsure: check() and
    loading say what is wrong with the model."""
    try:
        path = Path(hub.local_path(path))
    except ModelFileError:
        return False
    if path.is_dir():
        return (path / "text_encoder_2" / "config.json").is_file()
    if path.suffix.lower() == ".safetensors":
        keys = tensor_names(path) or ()  # the header only
    else:
        try:
            tensors = read_tensors(path)[0]  # a pickle, memory-mapped: no tensor is read yet
        except (ModelFileError, OSError):
            return False
        keys = list(tensors["state_dict"] if isinstance(tensors.get("state_dict"), dict) else tensors)
    return single_file.version(keys) == "SDXL"
