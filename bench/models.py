"""The benchmarks' models: each part of Stable Diffusion as minidb's module or as the reference's
(diffusers, transformers), filled with the same seeded random weights, and the process memory they
are measured by. Used by bench/rows.py, bench/train_memory.py and bench/cpu_bf16.py."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import random_tensor_  # noqa: E402


def random_(module, seed):
    """Deterministic weights at a sane scale (±1/√fan_in), norm weights near 1, drawn on the module's
    device (a 2.6 B-parameter UNet takes 10 s on two CPU cores, milliseconds on a GPU)."""
    import torch
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            random_tensor_(name, p, g)
    return module


# part: (config, seed) for each family
PARTS = {"SD 1.x": {"unet": ("SD1", 0), "vae": ("SD", 1), "text": ("SD1", 2)},
         "SDXL": {"unet": ("SDXL", 0), "vae": ("SDXL", 1), "text": ("SDXL_L", 2), "text_2": ("SDXL_G", 3)}}


def build(part, impl, device, dtype, family="SD 1.x", cfg=None):
    """One part with seeded weights, as minidb's or diffusers' / transformers' module (same tensors);
    `cfg`: a config of minidb's in place of the family's preset."""
    import diffusers
    import torch
    import transformers
    from minidb import text_encoder as te, unet as un, vae as va
    from minidb.convert import (native_to_diffusers_names, text_config_to_transformers, unet_blocks,
                                unet_config_to_diffusers, vae_attention_shape, vae_blocks, vae_config_to_diffusers)
    preset, seed = PARTS[family][part]
    module, cls = {"unet": (un, un.UNet), "vae": (va, va.AutoencoderKL), "text": (te, te.TextEncoder),
                   "text_2": (te, te.TextEncoder)}[part]
    cfg = cfg or getattr(module, preset)
    with torch.device("meta"):
        ours = cls(cfg)
    ours = random_(ours.to_empty(device=device), seed).to(dtype).eval()
    if impl == "minidb":
        return ours
    state = ours.state_dict()
    with torch.device("meta"):
        if part == "unet":
            kw = unet_config_to_diffusers(cfg)
            kw.pop("_class_name")
            ref, names = diffusers.UNet2DConditionModel(**kw), native_to_diffusers_names(state, unet_blocks(cfg))
        elif part == "vae":
            kw = vae_config_to_diffusers(cfg, 1024 if family == "SDXL" else 512)
            kw.pop("_class_name")
            ref, names = diffusers.AutoencoderKL(**kw), native_to_diffusers_names(state, vae_blocks(cfg))
            state = {k: vae_attention_shape(k, v, to_diffusers=True) for k, v in state.items()}
        else:  # SDXL's bigG: CLIPTextModelWithProjection, whose state keeps the text_model. prefix
            kw = {k: v for k, v in text_config_to_transformers(cfg).items() if k not in ("architectures", "model_type")}
            text_cls = transformers.CLIPTextModelWithProjection if cfg.projection else transformers.CLIPTextModel
            ref = text_cls(transformers.CLIPTextConfig(**kw))
            keys = ref.state_dict().keys()
            names = {k: k if k in keys else "text_model." + k for k in state}
    ref.load_state_dict({names[k]: v for k, v in state.items()}, strict=False, assign=True)
    for name, buffer in list(ref.named_buffers()):  # CLIP's position_ids: rebuild off the meta device
        if buffer.is_meta:
            ref.get_submodule(name.rsplit(".", 1)[0]).register_buffer(
                name.rsplit(".", 1)[1], torch.arange(buffer.shape[-1], device=device).expand(buffer.shape), persistent=False)
    assert not any(p.is_meta for p in ref.parameters())
    return ref.eval()


def parts_of(model):
    return [m for m in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)) if m is not None]


def rss_gb(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that
    over from the parent across fork + exec, so a child would report its parent's peak."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20
