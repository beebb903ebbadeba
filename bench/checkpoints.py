"""The load rows' checkpoints: fp16 single files with seeded random weights, shaped as SD 1.5's or
SDXL's, and the config folders diffusers' from_single_file reads offline.

The files are written one tensor at a time from shapes on the meta device (write_streamed), so no
model is ever held in memory: SDXL's file is 6.9 GB, and safetensors' own save_file first copies
every tensor into bytes, which needs twice the model.
"""

import json
import math
import struct
from pathlib import Path

import torch


def random_tensor_(name, t, g):
    """Uniform in ±1/√fan_in (matrices and kernels) or ±0.1 (vectors); weights of norms near 1."""
    bound = t[0].numel() ** -0.5 if t.ndim > 1 else 0.1
    t.uniform_(-bound, bound, generator=g)
    if "norm" in name and name.endswith("weight"):
        t.add_(1.0)
    return t


LOAD_FILES = {"SD 1.x": "sd15-fp16.safetensors", "SDXL": "sdxl-fp16.safetensors"}


def prepare_load_files(tmp, family):
    """An fp16 single file without minidb's metadata (as downloaded files are), and the local config
    folder diffusers' from_single_file needs offline. Written one tensor at a time from shapes on the
    meta device: SDXL's is 6.9 GB, and no model is ever held in memory."""
    from minidb.convert import text_config_to_transformers, unet_config_to_diffusers, vae_config_to_diffusers
    from minidb.writes import write_json
    from minidb.load import StableDiffusion
    from minidb.save import model_index, scheduler_config, single_file_tensors
    from minidb.tokenizer import Tokenizer
    from minidb import text_encoder as te, unet as un, vae as va
    xl = family == "SDXL"
    with torch.device("meta"):
        model = StableDiffusion(None, te.TextEncoder(te.SDXL_L if xl else te.SD1), va.AutoencoderKL(va.SDXL if xl else va.SD),
                                un.UNet(un.SDXL if xl else un.SD1), family, "epsilon", None,
                                te.TextEncoder(te.SDXL_G) if xl else None)
        shapes = {k: (tuple(t.shape), torch.float16) for k, t in single_file_tensors(model).items()}
    g = torch.Generator().manual_seed(0)
    path = Path(tmp) / LOAD_FILES[family]
    write_streamed(path, shapes, lambda k: random_tensor_(k, torch.empty(shapes[k][0]), g))
    cfg = Path(tmp) / ("config-xl" if xl else "config")
    write_json(cfg / "unet" / "config.json", unet_config_to_diffusers(model.unet.cfg))
    write_json(cfg / "vae" / "config.json", {**vae_config_to_diffusers(model.vae.cfg, model.resolution),
                                             **({"force_upcast": True} if xl else {})})
    write_json(cfg / "scheduler" / "scheduler_config.json", scheduler_config("epsilon", family))
    write_json(cfg / "model_index.json", model_index(family))
    for sub, text, version in (("", model.text_encoder, "SD 1.x"), ("_2", model.text_encoder_2, "SD 2.x")):
        if text is not None:
            write_json(cfg / f"text_encoder{sub}" / "config.json", text_config_to_transformers(text.cfg))
            Tokenizer.for_version(version).save(cfg / f"tokenizer{sub}")  # SDXL's second pads with "!" as SD 2's
    return path.stat().st_size


SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write_streamed(path, shapes, make, metadata=None):
    """A .safetensors file written one tensor at a time: shapes {name: (shape, dtype)}, make(name) -> the
    tensor. Peak memory is one tensor; safetensors' save_file first copies every tensor into bytes,
    which for SDXL's 10 GB fp32 UNet would need 20 GB."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, (shape, dtype) in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in shapes.items():
            t = make(name).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return path
