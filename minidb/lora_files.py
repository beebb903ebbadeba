"""LoRA files from elsewhere, read strictly and merged into the weights: what `sample.py --lora` and
`python -m minidb.info --merge-lora` use. The adapters themselves and kohya's names are in minidb/lora.py.

Tools name the same layers in different ways, and `read_lora` takes each of them (kohya's, above all):
    lora_unet_input_blocks_1_1_proj_in.lora_down.weight         ComfyUI: the original path
    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight        diffusers / PEFT: lora_A down, lora_B up
    text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight   (text_model. only before transformers 5;
                                                                      SDXL's second: text_encoder_2.)
    unet.<path>.lora.down.weight, <path>.processor.to_q_lora.down.weight,
    text_encoder.<path>.lora_linear_layer.down.weight               older diffusers files
diffusers keeps alpha in the file's metadata (`lora_adapter_metadata`: lora_alpha, alpha_pattern, as
PEFT's LoraConfig) rather than in `alpha` tensors; with neither, alpha = rank.

A file is refused in one sentence, before any weight changes, when a tensor finds no layer, a shape
does not fit, it was made for another model family, or it is another adapter kind (LoHa, LoKr, DoRA).

Legend: r rank, O/I a layer's output/input channels, k its kernel size.
"""

import json
import math
import re
import sys

import torch

from minidb.files import ModelFileError, json_loads, read_tensors
from minidb.lora import UNET, naming, text_parts

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


def _refuse_other_kinds(path, tensors):
    for key in tensors:
        kind = re.search(r"\.(hada_w|lokr_w|lora_mid|dora_scale|lora_magnitude_vector|oft_|diff$|diff_b$)", key)
        if kind:
            raise ModelFileError(f"{path} is a {OTHER_KINDS[kind[1]]} adapter ({key}), which minidb does not read; "
                                 "it reads plain LoRA and LoCon files.")


def _first(items, n=3):
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _pattern(key):
    """An alpha_pattern key as PEFT's get_pattern_key matches it against a layer's name."""
    return re.compile(rf"(.*\.)?({key})$")


def _finite_number(x):
    # JSON reads NaN and Infinity, and whole numbers too large for a float (alpha / rank would overflow)
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) <= sys.float_info.max


def _peft_scale(settings, part, name_in_file, rank):
    """alpha / rank as PEFT's LoraConfig in diffusers' metadata says, for one layer (alpha = rank if none)."""
    get = lambda key, default=None: settings.get(f"{part}.{key}", default)  # noqa: E731
    alpha = get("lora_alpha", rank)
    for key, value in (get("alpha_pattern") or {}).items():
        if _pattern(key).match(name_in_file):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if get("use_rslora") else rank)  # rsLoRA: alpha / sqrt(r)


def _problem(tensors, keys, shape=None, layer="each other"):
    """What makes one layer's tensors ({role: key}) unusable, or None: a down without its up or the reverse,
    a down and an up that do not fit a layer of `shape` (described as `layer`; without the model, the shape
    the two imply), an alpha that is not one number, weights that are not floating-point numbers (int8 cast to
    float is all zeros, bool is 0 and 1), or numbers that are not finite (black pictures)."""
    if "down" not in keys or "up" not in keys:
        has, lacks = ("down", "up") if "down" in keys else ("up" if "up" in keys else "alpha", "down")
        return f"has {keys[has]} without its {lacks} weight, so the file is incomplete"
    down, up = tensors[keys["down"]], tensors[keys["up"]]
    rank = down.shape[0] if down.ndim else 0
    if shape is None:
        shape = (up.shape[0] if up.ndim else 0, *down.shape[1:])
    kernel = (1, 1) if len(shape) == 4 else ()  # a conv's up is 1x1; its down has the layer's kernel
    fits = len(shape) in (2, 4) and down.shape == (rank, *shape[1:]) and up.shape == (shape[0], rank, *kernel)
    if rank == 0 or not fits:
        return (f"has {keys['down']} of shape {tuple(down.shape)} and {keys['up']} of shape {tuple(up.shape)}, which "
                f"do not fit {layer}")
    if "alpha" in keys and tensors[keys["alpha"]].numel() != 1:
        return f"has {keys['alpha']} of shape {tuple(tensors[keys['alpha']].shape)} where one number belongs"
    for role, key in keys.items():
        t = tensors[key]
        whole = role == "alpha" and not t.is_complex() and t.dtype != torch.bool  # kohya's alpha = rank is an int64
        if not (t.is_floating_point() or whole):  # cast to float, int8 weights would become zeros
            return (f"has {key} holding {str(t.dtype).removeprefix('torch.')} values where a LoRA holds "
                    "floating-point numbers, so the file is damaged or of another kind; download or export it again")
        if not torch.isfinite(t.float()).all():  # float(): torch has no isfinite for fp8
            return f"has {key} holding NaN or infinite numbers, so the file is damaged; download or export it again"
    return None


def _read(path, model):
    """The file's adapters, each checked against its layer -> [(part, layer, down, up, alpha / rank)]."""
    tensors, metadata = read_tensors(path)
    if isinstance(tensors.get("state_dict"), dict):  # a training checkpoint
        tensors = tensors["state_dict"]
    tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not any(_split(k) and _split(k)[1] != "alpha" for k in tensors):
        if any(k.startswith(FULL_MODEL) for k in tensors):
            raise ModelFileError(f"{path} is a full model checkpoint, not a LoRA; load it as the base model instead.")
        if {"emb_params", "clip_l"} & tensors.keys():  # a new word's vectors (A1111, SDXL), not a change
            raise ModelFileError(f"{path} is a textual-inversion embedding, not a LoRA: it adds a word rather than "
                                 f"changing weights, so draw with it by sample.py --embedding {path}.")
        raise ModelFileError(f"{path} holds no LoRA tensors (lora_down/lora_up or lora_A/lora_B), so it is not a LoRA.")
    _refuse_other_kinds(path, tensors)
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
        keys = {role: key for role, (key, _) in held.items()}
        layer = getattr(model, part).get_submodule(name)
        problem = _problem(tensors, keys, layer.weight.shape, f"the layer {ref} of shape {tuple(layer.weight.shape)}")
        if problem:
            _fail(path, model, tensors, metadata, problem)
        down, up, name_in_file = tensors[keys["down"]], tensors[keys["up"]], held["down"][1]
        rank = down.shape[0]
        if "alpha" in keys:
            scale = tensors[keys["alpha"]].item() / rank
        else:
            scale = _peft_scale(settings, part, name_in_file.removeprefix(f"{part}."), rank)
        adapters.append((part, layer, down, up, scale))
    return adapters


def _peft_settings(path, metadata):
    """diffusers' `lora_adapter_metadata`: a JSON object of LoraConfig fields prefixed with unet. / text_encoder."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        settings = json_loads(raw)
    except json.JSONDecodeError:
        settings = None
    problem = _alphas_problem(settings) if isinstance(settings, dict) else "that is not a JSON object of LoRA settings"
    if problem:
        raise ModelFileError(f"{path} has lora_adapter_metadata {problem}; the file is damaged, so download or "
                             "export it again.")
    return settings


def _alphas_problem(settings):
    """What is wrong with the alphas in PEFT's settings, or None: each must be a finite number, and each
    alpha_pattern key a regular expression."""
    for name, value in settings.items():
        if name.endswith(".lora_alpha") and not _finite_number(value):
            return f"whose {name} is {json.dumps(value)}, not a finite number"
        if name.endswith(".alpha_pattern") and value is not None:
            if not isinstance(value, dict):
                return f"whose {name} is not a JSON object of layer patterns and their alphas"
            for key, alpha in value.items():
                try:
                    _pattern(key)
                except re.error as e:
                    return f"whose {name} holds {key!r}, which is not a regular expression ({e.msg})"
                if not _finite_number(alpha):
                    return f"whose {name} gives {key!r} the alpha {json.dumps(alpha)}, not a finite number"
    return None


def _part_of(name):
    """Which part of the model a layer name in a file belongs to, by its prefix."""
    for prefixes, part in ((("lora_te2_", "text_encoder_2."), "text_encoder_2"),
                           (("lora_te1_", "lora_te_", "text_encoder."), "text_encoder")):
        if name.startswith(prefixes):
            return part
    return "unet"


def describe_lora(path, tensors, metadata):
    """What a LoRA file holds, without a model to apply it to (`python -m minidb.info LORA`): (the family
    it was made for or None, [(heading, text)] on its layout, layers, ranks and alphas). Other adapter
    kinds are one sentence (ModelFileError), since minidb cannot use them."""
    _refuse_other_kinds(path, tensors)
    layers = {}
    for key, t in tensors.items():
        if (split := _split(key)) and isinstance(t, torch.Tensor):
            layers.setdefault(split[0], {})[split[1]] = key
    for keys in layers.values():  # what reading checks, short of fitting the model's layers
        if problem := _problem(tensors, keys):
            raise ModelFileError(f"{path} {problem}.")
    downs = {name: tensors[keys["down"]] for name, keys in layers.items()}
    alphas = {name: tensors[keys["alpha"]] for name, keys in layers.items() if "alpha" in keys}
    layout = ("kohya's (AUTOMATIC1111, ComfyUI)" if any(k.startswith("lora_") for k in tensors) else
              "diffusers' / PEFT's" if any(".lora_A." in k for k in tensors) else "an older diffusers")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in downs.values()})
    family = _made_for(tensors, metadata)
    parts = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
    counts = [f"{n} {words}" for part, words in parts.items() if (n := sum(_part_of(name) == part for name in downs))]
    convs = sum(t.ndim == 4 and t.shape[-1] > 1 for t in downs.values())  # LoCon: 3x3 convolutions adapted too
    ranks = sorted({t.shape[0] for t in downs.values()})
    settings = _peft_settings(path, metadata)
    if alphas:
        # 4 significant digits, not decimals: an alpha of 1e-05 is not 0 (and fp16's 0.09998 reads as 0.1)
        values, source = sorted({float(f"{float(t.float().reshape(-1)[0]):.4g}") for t in alphas.values()}), ""
    else:
        values = sorted({v for k, v in settings.items() if k.endswith(".lora_alpha") and isinstance(v, (int, float))})
        source = " (lora_adapter_metadata)" if values else " (none given: alpha = rank)"
        values = values or ranks
    scale = f", scale {values[0] / ranks[0]:g}" if len(ranks) == len(values) == 1 else ""
    return family, [
        ("kind", f"a LoRA for {family or 'an unknown model family'}, {layout} layout, {' and '.join(dtypes)}"),
        ("layers", ", ".join(counts) + (f" ({convs} of them 3x3 convolutions: LoCon)" if convs else "")),
        ("rank", f"{', '.join(map(str, ranks))}; alpha {', '.join(f'{a:g}' for a in values)}{source}{scale}")]


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
    being unet, text_encoder and SDXL's text_encoder_2. A merged weight that is not finite (an alpha or
    weights too large for the model's dtype, or NaN already in the model) stops the merge with ModelFileError
    before that layer changes, but the layers before it are merged then: load the model again."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"The LoRA scale must be a finite number, not {scale!r}.")
    adapters = _read(path, model)  # everything in the file is checked before any weight changes
    merged = dict.fromkeys(["unet", *text_parts(model)], 0)
    with torch.no_grad():
        for part, layer, down, up, s in adapters:  # one update in memory at a time
            w = layer.weight
            new = (w.float() + scale * _delta(layer, down, up, s)).to(w.dtype)
            if not torch.isfinite(new.float()).all():  # checked as made, not in a second pass; float(): fp8 models
                raise ModelFileError(f"{path} at scale {scale:g} gives weights that are not finite numbers in "
                                     f"{str(w.dtype).removeprefix('torch.')}: its alpha or weights are far too large, "
                                     "or the model already held NaN; use another LoRA file or model.")
            w.copy_(new)
            merged[part] += 1
    return merged
