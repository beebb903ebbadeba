"""Load Stable Diffusion 1.x / 2.x weights from the two layouts people have on disk.

    model = load("path/to/stable-diffusion-v1-5")            # a diffusers folder
    model = load("v1-5-pruned-emaonly.safetensors")          # an original single file (.safetensors / .ckpt)

How minidb decides what a file is:
- Version. A single file with `cond_stage_model.transformer.*` (OpenAI CLIP) is SD 1.x, one with
  `cond_stage_model.model.*` (OpenCLIP) is SD 2.x. A diffusers folder's configs say it directly.
- Architecture. A diffusers folder's config.json files give it. A single file that minidb wrote
  carries its exact configs in its metadata; any other single file is read from its tensor shapes,
  so smaller or pruned SD-style models load too (minidb/detect.py).
- Prediction type (ε or v). A diffusers folder says it in scheduler/scheduler_config.json. A single
  file does not record it: SD 1.x files are ε; SD 2.x files are taken as v-prediction (the 768 models)
  when the weights look like it (ComfyUI's test: the std of one LayerNorm bias in the last up block
  above 0.09), else ε (the 512 "base" models). Pass prediction_type= to override the guess.
  Files that minidb wrote carry their prediction type in their metadata.

Loading is strict: every parameter must be filled from the file with the right shape, and every
tensor in the file must be used, apart from known extras (EMA copies, optimizer and trainer state,
DDPM schedule buffers, CLIP's position_ids, the OpenCLIP projection head SD does not use). Modules are
built on the "meta" device and the file's tensors are assigned to them, so no random weights are
ever materialized and no second copy of the model is made.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minidb import detect, text_encoder as te, unet as un, vae as va
from minidb.convert import (native_to_diffusers_names, openclip_to_native, text_config_from_transformers,
                            unet_blocks, unet_config_from_diffusers, vae_attention_shape, vae_blocks,
                            vae_config_from_diffusers)
from minidb.files import ModelFileError, read_json, read_tensors
from minidb.tokenizer import Tokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
# Buffers of the original training code's DDPM class, stored next to the weights (unused: minidb
# computes its schedule in minidb/schedulers.py).
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"}


@dataclass
class StableDiffusion:
    tokenizer: Tokenizer
    text_encoder: te.TextEncoder
    vae: va.AutoencoderKL
    unet: un.UNet
    version: str  # "SD 1.x", "SD 2.x" or "SDXL"
    prediction_type: str  # "epsilon" or "v_prediction"
    tokenizer_2: Tokenizer | None = None  # SDXL's second text tower (OpenCLIP-bigG) and its tokenizer,
    text_encoder_2: te.TextEncoder | None = None  # which pads with "!" (id 0)

    @property
    def resolution(self):  # the image side the model was trained at
        return self.unet.cfg.sample_size * 2 ** (len(self.vae.cfg.ch_mult) - 1)

    def configs(self):  # everything needed to rebuild the modules; stored in the files we write
        configs = {"version": self.version, "prediction_type": self.prediction_type, "unet": asdict(self.unet.cfg),
                   "vae": asdict(self.vae.cfg), "text_encoder": asdict(self.text_encoder.cfg)}
        if self.text_encoder_2 is not None:
            configs["text_encoder_2"] = asdict(self.text_encoder_2.cfg)
        return configs


def load(path, dtype=None, device="cpu", prediction_type=None):
    """Load a diffusers folder or a single-file checkpoint. dtype None keeps the file's dtype."""
    path = Path(path)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
    if not path.exists():
        raise ModelFileError(f"No model at {path}: pass a diffusers folder or a .safetensors / .ckpt file.")
    load_from = _load_diffusers if path.is_dir() else _load_single_file
    return load_from(path, dtype, torch.device(device), prediction_type)


# ---- shared by both layouts ----

def _build(cls, cfg, what):
    """`cls(cfg)` on the meta device: shapes only, no memory, no random init."""
    try:
        with torch.device("meta"):
            return cls(cfg)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. channels that GroupNorm(32) cannot split
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(f"The {what} has an architecture minidb cannot build ({reason}); "
                             "the file or its config is damaged.") from None


def _fill(cls, cfg, tensors, dtype, device, what):
    """Build `cls(cfg)` without allocating it and assign `tensors` (native names) to it, strictly."""
    module = _build(cls, cfg, what)
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} is {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {label} ({_few(keys)})" for label, keys in
                    (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if keys]
        raise ModelFileError(f"The {what} does not match its architecture: {'; '.join(problems)}.")
    dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    module.load_state_dict({k: tensors[k].to(device=device, dtype=dtype) for k in expected}, strict=True, assign=True)
    return module.eval()


def _few(keys, n=3):
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _from_diffusers_names(module_cls, cfg, blocks, tensors, what):
    """Rename diffusers keys to native ones using the map derived from the config."""
    native_keys = _build(module_cls, cfg, what).state_dict().keys()
    to_native = {d: n for n, d in native_to_diffusers_names(native_keys, blocks).items()}
    return {to_native.get(k, k): t for k, t in tensors.items()}


# ---- diffusers folders ----

_DIFFUSERS = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
              "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
WEIGHT_FILES = {"unet": _DIFFUSERS, "vae": _DIFFUSERS,  # in order of preference
                "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"]}


def _weights(folder, part):
    for name in WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return read_tensors(folder / part / name)[0]
    raise ModelFileError(f"{folder / part} has no weights file ({WEIGHT_FILES[part][0]} or another variant); "
                         "the diffusers folder is incomplete.")


def _settings(path):
    """A config file's JSON object; any other JSON value is one sentence naming the file."""
    c = read_json(path)
    if not isinstance(c, dict):
        raise ModelFileError(f"{path} holds a JSON {type(c).__name__} where an object of settings belongs; "
                             "the folder is damaged, so download or export it again.")
    return c


def _config(path, translate):
    """A config.json -> minidb config, with every problem told as one sentence naming the file."""
    try:
        return translate(_settings(path))
    except KeyError as e:
        raise ModelFileError(f"{path} lacks the entry {e}, so it is not an SD 1.x / 2.x config; "
                             "download or export the folder again.") from None
    except ModelFileError:
        raise
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}.") from None


def _scheduler_prediction_type(path):
    if not path.is_file():
        return "epsilon"
    pred = _settings(path).get("prediction_type", "epsilon")
    if pred not in detect.PREDICTION_TYPES:
        raise ModelFileError(f"{path}: prediction_type is {json.dumps(pred)}, but minidb knows only "
                             f"{' and '.join(detect.PREDICTION_TYPES)}; fix the entry or pass --prediction-type.")
    return pred


def _load_diffusers(folder, dtype, device, prediction_type):
    if not all((folder / p / "config.json").is_file() for p in ("unet", "vae", "text_encoder")):
        raise ModelFileError(f"{folder} is not a diffusers model folder: it needs unet/, vae/ and text_encoder/ "
                             "subfolders with config.json files.")
    ucfg = _config(folder / "unet" / "config.json", unet_config_from_diffusers)
    vcfg = _config(folder / "vae" / "config.json", vae_config_from_diffusers)
    tcfg = _config(folder / "text_encoder" / "config.json", text_config_from_transformers)
    version = "SD 1.x" if tcfg.activation == "quick_gelu" else "SD 2.x"

    what = f"UNet in {folder}"
    unet_tensors = _from_diffusers_names(un.UNet, ucfg, unet_blocks(ucfg), _weights(folder, "unet"), what)
    unet = _fill(un.UNet, ucfg, unet_tensors, dtype, device, what)
    what = f"VAE in {folder}"
    vae_tensors = _from_diffusers_names(va.AutoencoderKL, vcfg, vae_blocks(vcfg), _weights(folder, "vae"), what)
    vae_tensors = {k: vae_attention_shape(k, t, to_diffusers=False) for k, t in vae_tensors.items()}
    vae = _fill(va.AutoencoderKL, vcfg, vae_tensors, dtype, device, what)
    # transformers 4 wrote the text encoder with a `text_model.` prefix, transformers 5 without.
    text = {k.removeprefix("text_model."): t for k, t in _weights(folder, "text_encoder").items()
            if not k.endswith("position_ids")}
    text_encoder = _fill(te.TextEncoder, tcfg, text, dtype, device, f"text encoder in {folder}")

    pred = prediction_type or _scheduler_prediction_type(folder / "scheduler" / "scheduler_config.json")
    tok_dir = folder / "tokenizer"
    tokenizer = Tokenizer.from_folder(tok_dir) if tok_dir.is_dir() else Tokenizer.for_version(version)
    return StableDiffusion(tokenizer, text_encoder, vae, unet, version, pred)


# ---- single files ----

def _unsupported(keys, tensors):
    """What kind of unsupported file this is, or None if it looks like SD 1.x / 2.x."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet"
    if any("lora_" in k for k in keys):
        return "a LoRA, not a full model"
    if UNET + "input_blocks.0.0.weight" not in tensors:
        if "encoder.conv_in.weight" in tensors or VAE + "encoder.conv_in.weight" in tensors:
            return "a standalone VAE, not a full model"
        if "conv_in.weight" in tensors:
            return "a bare diffusers UNet file (pass the whole diffusers folder instead)"
        return "not a Stable Diffusion checkpoint (it has no model.diffusion_model.* tensors)"
    in_ch = tensors[UNET + "input_blocks.0.0.weight"].shape[1]
    special = {9: "an inpainting model", 8: "an InstructPix2Pix model", 7: "an x4 upscaler", 5: "a depth-to-image model"}
    if in_ch != 4:
        return special.get(in_ch, f"a UNet with {in_ch} input channels")
    if UNET + "label_emb.0.0.weight" in tensors:
        return "an unCLIP (image variation) model"
    if not any(k.startswith(VAE) for k in keys):
        return "a UNet without a VAE (no first_stage_model.* tensors)"
    if not any(k.startswith((CLIP, OPENCLIP)) for k in keys):
        return "a UNet without a text encoder (no cond_stage_model.* tensors)"
    return None


def _is_known_extra(key):
    return key.startswith("model_ema.") or key in DDPM_BUFFERS or key.endswith("embeddings.position_ids")


def _load_single_file(path, dtype, device, prediction_type):
    tensors, metadata = read_tensors(path)
    if isinstance(tensors.get("state_dict"), dict):  # a training checkpoint: the rest is trainer state
        tensors = tensors["state_dict"]
    tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    keys = list(tensors)
    kind = _unsupported(keys, tensors)
    if kind:
        raise ModelFileError(f"{path} is {kind}; minidb supports SD 1.x and 2.x text-to-image models only, "
                             "not this kind yet.")
    parts = {p: {k[len(p):]: t for k, t in tensors.items() if k.startswith(p)} for p in (UNET, VAE, CLIP, OPENCLIP)}
    leftover = [k for k in keys if not k.startswith((UNET, VAE, CLIP, OPENCLIP)) and not _is_known_extra(k)]
    if leftover:
        raise ModelFileError(f"{path} holds {len(leftover)} tensors that belong to no part of SD "
                             f"({_few(leftover)}); it is not a plain SD 1.x / 2.x checkpoint.")

    version = "SD 2.x" if parts[OPENCLIP] else "SD 1.x"
    if version == "SD 1.x":  # the text tower as the file names it: transformers' names, or OpenCLIP's
        text = {k.removeprefix("text_model."): t for k, t in parts[CLIP].items() if not _is_known_extra(k)}
    else:
        text = parts[OPENCLIP]
    if "minidb" in metadata:  # written by minidb: exact configs
        ucfg, vcfg, tcfg, pred = detect.configs_from_metadata(metadata["minidb"], version, path)
        pred = prediction_type or pred
    else:
        pred = prediction_type or detect.guess_prediction_type(version, parts[UNET])
        ucfg = detect.unet_config(parts[UNET], version, pred, path)
        vcfg, tcfg = detect.vae_config(parts[VAE], path), detect.text_config(text, version, path)
    if version == "SD 2.x":
        text, _unused = openclip_to_native(text, tcfg.layers)
    unet = _fill(un.UNet, ucfg, parts[UNET], dtype, device, f"{version} UNet in {path}")
    vae = _fill(va.AutoencoderKL, vcfg, parts[VAE], dtype, device, f"VAE in {path}")
    text_encoder = _fill(te.TextEncoder, tcfg, text, dtype, device, f"{version} text encoder in {path}")
    return StableDiffusion(Tokenizer.for_version(version), text_encoder, vae, unet, version, pred)
