"""Write a model in the two layouts other tools read.

- `save_diffusers(model, folder)`: a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/) that diffusers'
  `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) `.from_pretrained(folder)` opens.
  Its `metadata` (train.py's record of the run) goes into the header of the UNet's safetensors file,
  which diffusers does not read.
- `save_single_file(model, path)`: one original-layout `.safetensors`, as AUTOMATIC1111 and ComfyUI
  expect (minidb/single_file.py), with minidb's exact configs in its metadata so that minidb reloads
  it without guessing.

Every file is written to a temporary name and renamed into place (minidb/writes.py).
"""

import json
from pathlib import Path

import torch

from minidb.convert import (native_to_diffusers_names, native_to_openclip, text_config_to_transformers,
                            unet_blocks, unet_config_to_diffusers, vae_attention_shape, vae_blocks,
                            vae_config_to_diffusers)
from minidb.writes import write_json, write_safetensors
from minidb.schedulers import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, STEPS_OFFSET
from minidb.single_file import CLIP, OPENCLIP, UNET, V_PRED_MARKER, VAE, XL_CLIP, XL_OPENCLIP

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _cast(tensors, dtype):
    return {k: t if dtype is None else t.to(dtype) for k, t in tensors.items()}


def scheduler_config(prediction_type, version="SD 1.x"):
    """SD's noise schedule as diffusers reads it. SD 1.x / 2.x: DDIM, minidb's default sampler, with the
    keys of the public SD repositories, so each diffusers scheduler picks its own default spacing.
    SDXL: the scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0, Euler with "leading"
    spacing (diffusers' SCHEDULER_DEFAULT_CONFIG in single_file_utils holds the same)."""
    common = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": BETA_START, "beta_end": BETA_END,
              "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
              "set_alpha_to_one": False, "steps_offset": STEPS_OFFSET, "prediction_type": prediction_type}
    if version == "SDXL":
        return {"_class_name": "EulerDiscreteScheduler", **common, "interpolation_type": "linear",
                "sample_max_value": 1.0, "skip_prk_steps": True, "timestep_spacing": "leading",
                "use_karras_sigmas": False}
    return {"_class_name": "DDIMScheduler", **common}


def model_index(version):
    """model_index.json: which class diffusers builds for each subfolder."""
    if version != "SDXL":
        return {"_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
                "feature_extractor": [None, None], "requires_safety_checker": False}
    # as stable-diffusion-xl-base-1.0's; an empty negative prompt means zero embeddings (DESIGN.md)
    return {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [None, None], "image_encoder": [None, None]}


def _transformers_names(text_encoder):
    # With the `text_model.` prefix that transformers 4 needs (transformers 5 reads it too); a
    # CLIPTextModelWithProjection keeps its `text_projection.weight` beside `text_model`.
    return {k if k.startswith("text_projection.") else "text_model." + k: t
            for k, t in text_encoder.state_dict().items()}


def save_diffusers(model, folder, dtype=None, parts=PARTS, metadata=None):
    """Write `parts` of `model` (a minidb.load.StableDiffusion) as a diffusers folder, with `metadata`'s text
    entries in the UNet file's header (diffusers loads it with safetensors' load_file, which skips them).

    After DreamBooth training only the UNet (and maybe the text encoder) changed; parts=("unet",)
    rewrites just those into a folder that already holds the rest. SDXL's parts (text_encoder_2,
    tokenizer_2) are written only for an SDXL model.
    """
    folder = Path(folder)
    if "unet" in parts:
        unet = model.unet
        names = native_to_diffusers_names(unet.state_dict().keys(), unet_blocks(unet.cfg))
        write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                          _cast({names[k]: t for k, t in unet.state_dict().items()}, dtype),
                          metadata={"format": "pt", **(metadata or {})})  # "format": as diffusers writes it
        write_json(folder / "unet" / "config.json", unet_config_to_diffusers(unet.cfg))
    if "vae" in parts:
        vae = model.vae
        names = native_to_diffusers_names(vae.state_dict().keys(), vae_blocks(vae.cfg))
        tensors = {names[k]: vae_attention_shape(k, t, to_diffusers=True) for k, t in vae.state_dict().items()}
        write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", _cast(tensors, dtype))
        write_json(folder / "vae" / "config.json", vae_config_to_diffusers(vae.cfg, model.resolution))
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts and getattr(model, name, None) is not None:
            text_encoder = getattr(model, name)
            write_safetensors(folder / name / "model.safetensors", _cast(_transformers_names(text_encoder), dtype))
            write_json(folder / name / "config.json", text_config_to_transformers(text_encoder.cfg))
    for name in ("tokenizer", "tokenizer_2"):
        if name in parts and getattr(model, name, None) is not None:
            getattr(model, name).save(folder / name)
    if "scheduler" in parts:
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(model.prediction_type, model.version))
    write_json(folder / "model_index.json", model_index(model.version))


def single_file_tensors(model):
    """The whole model as original-layout tensors {key: tensor} (views of the model's own weights,
    except OpenCLIP's stacked q, k, v and transposed projection)."""
    tensors = {UNET + k: t for k, t in model.unet.state_dict().items()}
    tensors.update({VAE + k: t for k, t in model.vae.state_dict().items()})
    text = model.text_encoder.state_dict()
    if model.version == "SD 2.x":  # OpenCLIP names, as Stability's SD 2 files have them
        tensors.update({OPENCLIP + k: t for k, t in native_to_openclip(text).items()})
    else:  # CLIP-L in transformers' names: SD 1.x, and SDXL's first tower
        prefix = XL_CLIP if model.version == "SDXL" else CLIP
        tensors.update({prefix + "text_model." + k: t for k, t in text.items()})
    if model.version == "SDXL":  # bigG in OpenCLIP names, as sd_xl_base_1.0.safetensors has it
        tensors.update({XL_OPENCLIP + k: t for k, t in native_to_openclip(model.text_encoder_2.state_dict()).items()})
    return tensors


def save_single_file(model, path, dtype=None, metadata=None):
    """Write the whole model as one original-layout .safetensors file (with `metadata`'s text entries too).
    A v-prediction model also gets the empty `v_pred` tensor: ComfyUI reads an SDXL file as v-prediction only
    when it has one (supported_models.py SDXL.model_type), and writes it itself for every v-prediction model
    it saves (model_base.py state_dict_for_saving)."""
    metadata = {"format": "pt", **(metadata or {}), "minidb": json.dumps(model.configs())}
    tensors = _cast(single_file_tensors(model), dtype)
    if model.prediction_type == "v_prediction":
        tensors[V_PRED_MARKER] = torch.zeros(0)
    write_safetensors(path, tensors, metadata=metadata)
