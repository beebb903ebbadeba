"""Write a model in the two layouts other tools read.

- `save_diffusers(model, folder)`: a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/) that `StableDiffusionPipeline.from_pretrained(folder)` opens.
- `save_single_file(model, path)`: one original-layout `.safetensors`, as AUTOMATIC1111 and ComfyUI
  expect, with minidb's exact configs in its metadata so that minidb reloads it without guessing.

Every file is written to a temporary name and renamed into place (minidb/files.py).
"""

import json
from pathlib import Path

from minidb.convert import (native_to_diffusers_names, native_to_openclip, text_config_to_transformers,
                            unet_blocks, unet_config_to_diffusers, vae_attention_shape, vae_blocks,
                            vae_config_to_diffusers)
from minidb.files import write_json, write_safetensors
from minidb.load import CLIP, OPENCLIP, UNET, VAE
from minidb.schedulers import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, STEPS_OFFSET

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _cast(tensors, dtype):
    return {k: t if dtype is None else t.to(dtype) for k, t in tensors.items()}


def scheduler_config(prediction_type):
    """SD's noise schedule as diffusers reads it. DDIM is minidb's default sampler; the keys are the
    ones of the public SD repositories, so each diffusers scheduler picks its own default spacing."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": BETA_START,
            "beta_end": BETA_END, "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": STEPS_OFFSET, "prediction_type": prediction_type}


def save_diffusers(model, folder, dtype=None, parts=PARTS):
    """Write `parts` of `model` (a minidb.load.StableDiffusion) as a diffusers folder.

    After DreamBooth training only the UNet (and maybe the text encoder) changed; parts=("unet",)
    rewrites just those into a folder that already holds the rest.
    """
    folder = Path(folder)
    if "unet" in parts:
        unet = model.unet
        names = native_to_diffusers_names(unet.state_dict().keys(), unet_blocks(unet.cfg))
        write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors",
                          _cast({names[k]: t for k, t in unet.state_dict().items()}, dtype))
        write_json(folder / "unet" / "config.json", unet_config_to_diffusers(unet.cfg))
    if "vae" in parts:
        vae = model.vae
        names = native_to_diffusers_names(vae.state_dict().keys(), vae_blocks(vae.cfg))
        tensors = {names[k]: vae_attention_shape(k, t, to_diffusers=True) for k, t in vae.state_dict().items()}
        write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", _cast(tensors, dtype))
        write_json(folder / "vae" / "config.json", vae_config_to_diffusers(vae.cfg, model.resolution))
    if "text_encoder" in parts:
        # With the `text_model.` prefix that transformers 4 needs; transformers 5 reads it too.
        tensors = {"text_model." + k: t for k, t in model.text_encoder.state_dict().items()}
        write_safetensors(folder / "text_encoder" / "model.safetensors", _cast(tensors, dtype))
        write_json(folder / "text_encoder" / "config.json", text_config_to_transformers(model.text_encoder.cfg))
    if "tokenizer" in parts:
        model.tokenizer.save(folder / "tokenizer")
    if "scheduler" in parts:
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(model.prediction_type))
    write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False})


def save_single_file(model, path, dtype=None):
    """Write the whole model as one original-layout .safetensors file."""
    tensors = {UNET + k: t for k, t in model.unet.state_dict().items()}
    tensors.update({VAE + k: t for k, t in model.vae.state_dict().items()})
    text = model.text_encoder.state_dict()
    if model.version == "SD 2.x":  # OpenCLIP names, as Stability's SD 2 files have them
        tensors.update({OPENCLIP + k: t for k, t in native_to_openclip(text).items()})
    else:
        tensors.update({CLIP + "text_model." + k: t for k, t in text.items()})
    metadata = {"format": "pt", "minidb": json.dumps(model.configs())}
    write_safetensors(path, _cast(tensors, dtype), metadata=metadata)
