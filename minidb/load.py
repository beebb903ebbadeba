"""Load Stable Diffusion 1.x / 2.x / XL weights from the two layouts people have on disk.

    model = load("path/to/stable-diffusion-v1-5")            # a diffusers folder
    model = load("v1-5-pruned-emaonly.safetensors")          # an original single file (.safetensors / .ckpt)
    model = load("stable-diffusion-v1-5/stable-diffusion-v1-5")  # a Hugging Face Hub id (minidb/hub.py)

How minidb decides what a file is:
- Version. A single file's text-encoder prefixes say it (minidb/single_file.py): OpenAI CLIP is
  SD 1.x, OpenCLIP SD 2.x, the two `conditioner.embedders` towers SDXL. A diffusers folder's configs
  say it directly (SDXL: text_encoder_2/ and a UNet with added conditioning).
- Architecture. A diffusers folder's config.json files give it. A single file that minidb wrote
  carries its exact configs in its metadata; any other single file is read from its tensor shapes,
  so smaller or pruned SD-style models load too (minidb/detect.py).
- Prediction type (ε or v). A diffusers folder says it in scheduler/scheduler_config.json. A single
  file does not record it: SD 1.x and SDXL files are ε, unless they carry ComfyUI's `v_pred` marker;
  SD 2.x files are taken as v-prediction (the 768 models) when the weights look like it (ComfyUI's
  test: the std of one LayerNorm bias in the last up block above 0.09), else ε (the 512 "base"
  models). Pass prediction_type= to override the guess. Files that minidb wrote carry their
  prediction type in their metadata.

Loading is strict: every parameter must be filled from the file with the right shape, and every
tensor in the file must be used, apart from known extras (EMA copies, optimizer and trainer state,
schedule buffers, CLIP's position_ids, the OpenCLIP head SD 2 does not use). Modules are built on the
"meta" device and the file's tensors are assigned to them, so no random weights are ever
materialized and no second copy of the model is made.
"""

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minidb import detect, hub, single_file, text_encoder as te, unet as un, vae as va
from minidb.convert import (native_to_diffusers_names, openclip_to_native, text_config_from_transformers,
                            unet_blocks, unet_config_from_diffusers, vae_attention_shape, vae_blocks,
                            vae_config_from_diffusers)
from minidb.files import ModelFileError, read_json, read_tensors
from minidb.runs import given_as_model
from minidb.tokenizer import Tokenizer
from minidb.unet import SIZE_FEATURES

# What SDXL's pipeline changes in its two text towers: both give the penultimate layer's output
# without the final LayerNorm (diffusers' StableDiffusionXLPipeline: hidden_states[-2]).
SDXL_TEXT = {"skip_last": 1, "final_norm": False}


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
    """Load a diffusers folder, a single-file checkpoint or a Hub id. dtype None keeps the file's dtype."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
    path = Path(hub.local_path(path))  # a Hub id -> its snapshot folder in the Hugging Face cache
    if not path.exists():
        raise ModelFileError(f"No model at {path}: pass a diffusers folder, a .safetensors / .ckpt file or a "
                             "Hugging Face Hub id (owner/name).")
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
    wrong += [f"{k} holds {str(tensors[k].dtype).removeprefix('torch.')} numbers, not floating-point ones"  # cast, int8
              for k in expected if k in tensors and not tensors[k].is_floating_point()]  # weights would load as whole numbers
    if missing or unexpected or wrong:
        problems = [f"{len(keys)} {label} ({_few(keys)})" for label, keys in
                    (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes or types", wrong)) if keys]
        raise ModelFileError(f"The {what} does not match its architecture: {'; '.join(problems)}; the file is "
                             "incomplete or damaged, so download or export it again.")
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


def _check_sdxl(cfgs, where):
    """SDXL's parts must fit together: the UNet attends to both towers' features side by side, and
    its added conditioning takes bigG's pooled vector plus six size features."""
    unet, one, two = cfgs["unet"], cfgs["text_encoder"], cfgs["text_encoder_2"]
    pooled = unet.adm_in_channels - 6 * SIZE_FEATURES
    if unet.context_dim != one.width + two.width:
        problem = f"its UNet attends to {unet.context_dim}-wide text, its text encoders give {one.width} + {two.width}"
    elif pooled != two.projection:
        problem = (f"its UNet's added conditioning takes {unet.adm_in_channels} features, which leaves {pooled} for "
                   f"the pooled text, but the second text encoder's pooled vector is {two.projection} wide")
    else:
        return
    raise ModelFileError(f"The SDXL model in {where} does not fit together ({problem}); it is damaged or another "
                         "kind of model.")


MODULES = {"unet": un.UNet, "vae": va.AutoencoderKL, "text_encoder": te.TextEncoder, "text_encoder_2": te.TextEncoder}


def _model(modules, version, pred, tokenizers):
    return StableDiffusion(tokenizers[0], modules["text_encoder"], modules["vae"], modules["unet"], version, pred,
                           tokenizers[1], modules.get("text_encoder_2"))


def _tokenizers(version, folder=None):
    """A diffusers folder's tokenizer/ (and SDXL's tokenizer_2/), or else minidb's shipped ones, which
    differ in their pad id: EOS for SD 1.x and SDXL's first, "!" (id 0) for SD 2.x and SDXL's second."""
    shipped = {"SD 1.x": ["SD 1.x"], "SD 2.x": ["SD 2.x"], "SDXL": ["SD 1.x", "SD 2.x"]}[version]
    found = [folder / sub if folder and (folder / sub).is_dir() else None for sub in ("tokenizer", "tokenizer_2")]
    tokenizers = [Tokenizer.from_folder(sub) if sub else Tokenizer.for_version(v) for sub, v in zip(found, shipped)]
    return tokenizers + [None] * (2 - len(tokenizers))


# ---- diffusers folders ----

_DIFFUSERS = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
              "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
_TRANSFORMERS = ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"]
WEIGHT_FILES = {"unet": _DIFFUSERS, "vae": _DIFFUSERS,  # in order of preference
                "text_encoder": _TRANSFORMERS, "text_encoder_2": _TRANSFORMERS}


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
        raise ModelFileError(f"{path} lacks the entry {e}, so it is not an SD 1.x / 2.x / XL config; "
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
    has = {p: (folder / p / "config.json").is_file() for p in ("unet", "vae", "text_encoder", "text_encoder_2")}
    if has["text_encoder_2"] and not has["text_encoder"]:
        raise ModelFileError(f"{folder} is the SDXL refiner (its only text encoder is text_encoder_2/); minidb "
                             "supports SD 1.x, 2.x and SDXL text-to-image models only, not this kind yet.")
    if not (has["unet"] and has["vae"] and has["text_encoder"]):
        raise ModelFileError(given_as_model(folder) or f"{folder} is not a diffusers model folder: it needs unet/, vae/ and text_encoder/ "
                             "subfolders with config.json files.")
    cfgs = {"unet": _config(folder / "unet" / "config.json", unet_config_from_diffusers),
            "vae": _config(folder / "vae" / "config.json", vae_config_from_diffusers),
            "text_encoder": _config(folder / "text_encoder" / "config.json", text_config_from_transformers)}
    if has["text_encoder_2"] != bool(cfgs["unet"].adm_in_channels):
        half = ("it has text_encoder_2/, but its UNet lacks SDXL's added conditioning" if has["text_encoder_2"] else
                "its UNet has SDXL's added conditioning, but the folder has no text_encoder_2/")
        raise ModelFileError(f"{folder} is half an SDXL model ({half}); download or export the folder again.")
    if has["text_encoder_2"]:
        version = "SDXL"
        cfgs["text_encoder_2"] = _config(folder / "text_encoder_2" / "config.json", text_config_from_transformers)
        for name in ("text_encoder", "text_encoder_2"):  # the pipeline's choice, not in transformers' config
            cfgs[name] = dataclasses.replace(cfgs[name], **SDXL_TEXT)
        _check_sdxl(cfgs, folder)
    else:
        version = "SD 1.x" if cfgs["text_encoder"].activation == "quick_gelu" else "SD 2.x"

    modules = {}
    for name, blocks in (("unet", unet_blocks), ("vae", vae_blocks)):
        what = f"{'UNet' if name == 'unet' else 'VAE'} in {folder}"
        tensors = _from_diffusers_names(MODULES[name], cfgs[name], blocks(cfgs[name]), _weights(folder, name), what)
        if name == "vae":
            tensors = {k: vae_attention_shape(k, t, to_diffusers=False) for k, t in tensors.items()}
        modules[name] = _fill(MODULES[name], cfgs[name], tensors, dtype, device, what)
    for name in [p for p in ("text_encoder", "text_encoder_2") if p in cfgs]:
        # transformers 4 wrote the text encoder with a `text_model.` prefix, transformers 5 without
        # (CLIPTextModelWithProjection keeps it, with `text_projection.weight` beside it).
        text = {k.removeprefix("text_model."): t for k, t in _weights(folder, name).items()
                if not k.endswith("position_ids")}
        modules[name] = _fill(te.TextEncoder, cfgs[name], text, dtype, device, f"{name.replace('_', ' ')} in {folder}")

    pred = prediction_type or _scheduler_prediction_type(folder / "scheduler" / "scheduler_config.json")
    return _model(modules, version, pred, _tokenizers(version, folder))


# ---- single files ----

def _load_single_file(path, dtype, device, prediction_type):
    tensors, metadata = read_tensors(path)
    if isinstance(tensors.get("state_dict"), dict):  # a training checkpoint: the rest is trainer state
        tensors = tensors["state_dict"]
    tensors = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    return from_original(tensors, metadata, path, dtype, device, prediction_type)


def from_original(tensors, metadata, path, dtype=None, device=torch.device("cpu"), prediction_type=None):
    """A model from a single file's tensors in the original layout (on the meta device they give the
    shapes of a real-size model without its memory: tests/test_sdxl_files.py)."""
    kind = single_file.unsupported(tensors)
    if kind and kind.startswith(("a LoRA", "a textual-inversion")):  # an add-on that minidb does read, elsewhere
        use = f"--lora {path} (python -m minidb.info --merge-lora bakes it into a model file)" \
            if kind.startswith("a LoRA") else f"--embedding {path}"
        raise ModelFileError(f"{path} is {kind}; draw with a base model and this file: sample.py {use}.")
    if kind:
        raise ModelFileError(given_as_model(path) or f"{path} is {kind}; minidb supports SD 1.x, 2.x and SDXL "
                             "text-to-image models only, not this kind yet.")
    version = single_file.version(tensors)
    parts, leftover = single_file.split(tensors, version)
    if leftover:
        raise ModelFileError(f"{path} holds {len(leftover)} tensors that belong to no part of {version} "
                             f"({_few(leftover)}); it is not a plain {version} checkpoint.")
    if "minidb" in metadata:  # written by minidb: exact configs
        cfgs, pred = detect.configs_from_metadata(metadata["minidb"], version, path)
        pred = prediction_type or pred
    else:
        marked = "v_prediction" if single_file.V_PRED_MARKER in tensors else None
        pred = prediction_type or marked or detect.guess_prediction_type(version, parts["unet"])
        cfgs = {"unet": detect.unet_config(parts["unet"], version, pred, path),
                "vae": detect.vae_config(parts["vae"], path, version),
                "text_encoder": detect.text_config(parts["text_encoder"], version, path)}
        if version == "SDXL":
            cfgs["text_encoder_2"] = detect.text_config(parts["text_encoder_2"], version, path, second=True)
    if version == "SDXL":
        _check_sdxl(cfgs, path)
    # OpenCLIP's names -> minidb's: SD 2 leaves out its last layer, SDXL's bigG uses all and its projection.
    if version == "SD 2.x":
        parts["text_encoder"], _unused = openclip_to_native(parts["text_encoder"], cfgs["text_encoder"].layers)
    if version == "SDXL":
        parts["text_encoder_2"], _unused = openclip_to_native(parts["text_encoder_2"], None, projection=True)
    what = {"unet": f"{version} UNet", "vae": "VAE", "text_encoder": f"{version} text encoder",
            "text_encoder_2": "SDXL second text encoder (OpenCLIP-bigG)"}
    modules = {name: _fill(MODULES[name], cfg, parts[name], dtype, device, f"{what[name]} in {path}")
               for name, cfg in cfgs.items()}
    return _model(modules, version, pred, _tokenizers(version))
