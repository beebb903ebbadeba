"""Text to image: the sampling loop of Stable Diffusion with classifier-free guidance.

    prompt -> tokenizer -> text encoder -> context (B, 77, C)
    noise z_T ~ N(0, I) of shape (n, 4, H/8, W/8), from a CPU generator seeded with `seed`
    for t in sampler.timesteps:
        ε_u, ε_c = UNet([z_t, z_t], t, [context("negative prompt"), context(prompt)])
        ε = ε_u + g (ε_c − ε_u)                                  (Ho & Salimans 2022, arXiv 2207.12598)
        z_{t-1} = sampler.step(ε, t, z_t)
    image = VAE.decode(z_0 / 0.18215)

SDXL (Podell et al. 2023, arXiv 2307.01952) differs in three places: two text encoders whose features
are concatenated (context 2048 wide), an added conditioning y of the pooled text and the image's sizes
that the UNet adds to its time embedding, and a VAE scale of 0.13025 instead of 0.18215.

Every choice that changes the pixels follows diffusers' StableDiffusionPipeline (and for SDXL its
StableDiffusionXLPipeline), so that the same seed and settings give the same picture: the noise is
drawn on the CPU in float32 for the whole batch at once, the unconditional half comes first, guidance
is skipped when g <= 1, samplers draw their own noise from the same generator, and SDXL's missing
negative prompt is zeros (force_zeros_for_empty_prompt).
"""

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from minidb.graphs import UnetGraph, can_graph
from minidb.samplers import DPMSolverPP2MSampler, EulerAncestralSampler, EulerSampler
from minidb.schedulers import DDIMSampler, DDPMSampler
from minidb.unet import size_features

SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler, "euler": EulerSampler, "euler-a": EulerAncestralSampler,
            "dpmpp-2m": DPMSolverPP2MSampler}
# Each sampler as AUTOMATIC1111 (1.9 and later) records it in a PNG's "parameters": its Sampler and
# Schedule type fields, and any extra field. A1111 names the timestep schedule apart from the method,
# and its "DPM++ 2M" on its own means the Karras schedule (sd_samplers_kdiffusion.py). minidb's samplers
# space their timesteps as diffusers does with SD's scheduler config, which in A1111's terms
# (sd_schedulers.py) is:
# - Euler, Euler a: "linspace", n timesteps from 999 to 0, then σ = 0: A1111's "Uniform" (k-diffusion's
#   get_sigmas(n)). Between integer timesteps diffusers interpolates σ linearly, A1111 log σ: a small difference.
# - DPM++ 2M: "linspace" over n + 1 points from 999 to 0, the last dropped, then σ = 0: A1111's
#   "SGM Uniform" (diffusers rounds those timesteps to integers, A1111 does not).
# - DDIM: "leading" spacing with offset 1 (853, 711, ..., 1 at 7 steps). A1111's DDIM takes
#   range(0, 1000, 1000 // n) + 1 (sd_samplers_timesteps.py): the same timesteps when n divides 1000
#   (20, 25, 50, ...), else one more near 999 (31 at 30 steps). It takes no schedule type; A1111 writes
#   its default, "Automatic".
# - DDPM: A1111 has no DDPM. Ancestral DDPM on a subsequence of timesteps is DDIM with η = 1 (Song et al.
#   2020, eq. 16), which A1111 records as "Eta DDIM: 1". Only the last jump differs: to ᾱ = 1 here, to ᾱ_0 in DDIM.
SAMPLER_NAMES = {"ddim": ("DDIM", "Automatic", {}), "ddpm": ("DDIM", "Automatic", {"Eta DDIM": 1}),
                 "euler": ("Euler", "Uniform", {}), "euler-a": ("Euler a", "Uniform", {}),
                 "dpmpp-2m": ("DPM++ 2M", "SGM Uniform", {})}


def a1111_names(sampler, version):
    """SAMPLER_NAMES[sampler] as drawn for `version`. SDXL's samplers space their timesteps "leading" (below),
    which for Euler and Euler a is A1111's "DDIM" schedule type (sd_schedulers.py ddim_scheduler: 1 + k · (1000
    // n), with the DDIM sampler's one extra timestep when n does not divide 1000). DPM++ 2M's leading spacing,
    1 + k · (1000 // (n + 1)) for k = n..1, is in no A1111 schedule; "DDIM" is the one of its kind."""
    name, schedule, extra = SAMPLER_NAMES[sampler]
    return name, "DDIM" if version == "SDXL" and schedule != "Automatic" else schedule, extra


# What each version draws best with when nothing else is asked: SD's own DDIM at guidance 7.5, and
# SDXL's diffusers scheduler config (Euler, "leading" spacing) at its recommended guidance 5.0. sample.py
# takes them as its defaults; train.py draws the class prior and the validation grids with them.
DEFAULTS = {"SD 1.x": {"sampler": "ddim", "guidance": 7.5}, "SD 2.x": {"sampler": "ddim", "guidance": 7.5},
            "SDXL": {"sampler": "euler", "guidance": 5.0}}


def token_ids(tokenizer, prompts, long=False):
    """Prompts -> (B, 77) ids, truncated as diffusers does (with a warning); with long=True, (B, k, 77):
    every prompt whole, in k chunks of 75 tokens (AUTOMATIC1111's long prompts; shorter ones are padded
    with empty chunks)."""
    if not long:
        return tokenizer(prompts)
    rows = [tokenizer.chunks(p) for p in prompts]
    k = max(len(r) for r in rows)
    return torch.stack([tokenizer.chunks(p, k) for p in prompts])


def encode_tokens(model, ids, ids_2=None):
    """Token ids -> (context (B, 77 k, C), pooled (B, P) or None). SD has one text encoder. SDXL has
    two, whose features are put side by side (768 + 1280 = 2048), and the second's pooled vector goes to
    the UNet's added conditioning. Chunked ids (B, k, 77) are encoded chunk by chunk and concatenated
    along the sequence; the pooled vector is the first chunk's, as A1111 and ComfyUI take it."""
    b, k = len(ids), ids.shape[1] if ids.dim() == 3 else 1
    context = model.text_encoder(ids.reshape(b * k, -1)).reshape(b, k * ids.shape[-1], -1)
    if model.text_encoder_2 is None:
        return context, None
    context_2, pooled = model.text_encoder_2(ids_2.reshape(b * k, -1), pooled=True)
    context_2 = context_2.reshape(b, k * ids_2.shape[-1], -1)
    return torch.cat([context, context_2], dim=-1), pooled.reshape(b, k, -1)[:, 0]


@torch.no_grad()
def encode_prompt(model, prompts, long=False):
    """Prompts -> (context (B, 77, C), or (B, 77 k, C) for long prompts; pooled (B, P) or None) on the
    text encoder's device and dtype (encode_tokens)."""
    device = next(model.text_encoder.parameters()).device
    ids = token_ids(model.tokenizer, prompts, long).to(device)
    ids_2 = token_ids(model.tokenizer_2, prompts, long).to(device) if model.tokenizer_2 is not None else None
    return encode_tokens(model, ids, ids_2)


def added_conditioning(pooled, original_size, crop=(0, 0), target_size=None):
    """SDXL's `y` (B, 2816): the pooled text, and the image's micro-conditioning (SDXL paper, 2.2): the
    size it had before resizing, its crop's top-left corner, the size asked for, each as (height, width)
    and turned into sinusoidal features. Drawing asks for an uncropped picture of its own size."""
    target_size = target_size or original_size
    time_ids = torch.tensor([[*original_size, *crop, *target_size]], dtype=torch.float32, device=pooled.device)
    return torch.cat([pooled.float(), size_features(time_ids.expand(len(pooled), 6))], dim=1)


def bf16_for_autocast(module):
    """Turn the weights of `module`'s convolutions and linear layers into bf16, in place, for inference under
    bf16 autocast: autocast runs those layers in bf16 anyway, and would otherwise cast their fp32 weights
    again at every call (for SD's UNet, 3.4 GB read and 1.7 GB written per step). Norms, embeddings and
    everything autocast keeps in fp32 keep their fp32 weights. Returns the module."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
    return module


def initial_noise(n, height, width, seed, channels=4, factor=8):
    """The starting latents, drawn as diffusers users expect for a given seed (see DESIGN.md):
    one CPU generator, float32, the whole batch in one call. Returns the generator too, since
    stochastic samplers keep drawing from it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((n, channels, height // factor, width // factor), generator=generator), generator


@torch.no_grad()
def sample_latents(model, prompt, negative_prompt="", n=1, steps=50, guidance=7.5, seed=0, height=512, width=512,
                   sampler="ddim", progress=True, long_prompts=False, cuda_graph=True, graph=None):
    """Run the denoising loop; returns the final latents (n, C, H/f, W/f) of the model's VAE, still multiplied by
    its scale_factor (0.18215 for SD, 0.13025 for SDXL; decode divides it out).
    With long_prompts, the prompt and the negative prompt are read whole (encode_prompt); when their
    lengths differ, the two halves of guidance go through the UNet separately, as A1111 does.
    On a GPU the UNet's steps are replayed as a CUDA graph (minidb/graphs.py) unless cuda_graph=False:
    `graph`, a UnetGraph(model.unet) kept by the caller, records once for many calls; else each call records."""
    p = next(model.unet.parameters())
    context, pooled = encode_prompt(model, [prompt], long_prompts)  # one encoding serves every image
    y = added_conditioning(pooled, (height, width)) if pooled is not None else None  # SDXL
    guide = guidance > 1  # as diffusers: no unconditional pass at g <= 1 (at g = 1 the formula gives the
    # conditional prediction exactly; below 1 it would blend towards the unconditional one, which diffusers skips too)
    if guide:
        if y is not None and not negative_prompt:  # SDXL: no negative prompt means zeros, not "" encoded
            negative, negative_y = torch.zeros_like(context), added_conditioning(torch.zeros_like(pooled), (height, width))
        else:
            negative, negative_pooled = encode_prompt(model, [negative_prompt], long_prompts)
            negative_y = added_conditioning(negative_pooled, (height, width)) if y is not None else None
        y = torch.cat([negative_y, y]) if y is not None else None
        if negative.shape[1] == context.shape[1]:
            context = torch.cat([negative, context])  # (2, 77, C)
        else:  # long prompts of different lengths: one context per half, each pass on its own
            context = [negative.to(p.dtype).repeat_interleave(n, dim=0), context.to(p.dtype).repeat_interleave(n, dim=0)]
    if torch.is_tensor(context):
        context = context.to(p.dtype).repeat_interleave(n, dim=0)  # (2n, 77, C): n unconditional, then n conditional
    y = y.to(p.dtype).repeat_interleave(n, dim=0) if y is not None else None

    # SDXL's scheduler config names "leading" spacing, which then holds for every sampler (minidb/samplers.py)
    solver = SAMPLERS[sampler](model.prediction_type, **({"spacing": "leading"} if model.version == "SDXL" else {}))
    solver.set_timesteps(steps)
    factor = 2 ** (len(model.vae.cfg.ch_mult) - 1)
    noise, generator = initial_noise(n, height, width, seed, model.unet.cfg.in_channels, factor)
    x = (noise * solver.init_noise_sigma).to(p.device, p.dtype)
    graphed = cuda_graph and torch.is_tensor(context) and can_graph(model.unet, x)
    unet = (graph or UnetGraph(model.unet)) if graphed else model.unet

    for t in tqdm(solver.timesteps, desc="denoising", disable=not progress, leave=False):
        x_in = solver.scale_model_input(torch.cat([x, x]) if guide else x, t)
        if torch.is_tensor(context):
            out = unet(x_in, t, context, y)
        else:
            out = torch.cat([model.unet(half, t, c, None if y is None else y[k * n:(k + 1) * n])
                             for k, (half, c) in enumerate(zip(x_in.chunk(2), context))])
        if guide:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = solver.step(out, t, x, generator)
    return x


class NotFinite(ValueError):
    """The VAE decoded NaN or infinite numbers (broken weights, or fp16 overflow), which would be black pixels."""


@torch.no_grad()
def decode(model, latents):
    """Latents -> list of PIL images, one VAE call per image to bound memory."""
    p = next(model.vae.parameters())
    images = []
    for z in latents:
        image = model.vae.decode((z[None] / model.vae.cfg.scale_factor).to(p.device, p.dtype))[0]  # (3, H, W), ~[-1, 1]
        if not torch.isfinite(image).all():
            raise NotFinite("the VAE decoded NaN or infinite numbers")
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray((image * 255).round().astype(np.uint8)))
    return images


def generate(model, prompt, **kwargs):
    """sample_latents + decode: the whole text-to-image pipeline. Returns (images, latents)."""
    latents = sample_latents(model, prompt, **kwargs)
    return decode(model, latents), latents


def grid(images, cols=None):
    """Tile images into a grid, near-square unless `cols` is given."""
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet
