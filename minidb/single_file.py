"""The original single-file layout (CompVis / Stability, as AUTOMATIC1111 and ComfyUI read it): which
prefix holds which part in each version, what else such files carry, and what kind of model a file is.

    part          SD 1.x                          SD 2.x                    SDXL
    UNet          model.diffusion_model.*         (same)                    (same, plus label_emb)
    VAE           first_stage_model.*             (same)                    (same)
    text encoder  cond_stage_model.transformer.   cond_stage_model.model.   conditioner.embedders.0.transformer.
                  text_model.* (transformers)     * (OpenCLIP names)        text_model.* (CLIP-L, transformers)
    text 2        -                               -                         conditioner.embedders.1.model.*
                                                                            (OpenCLIP-bigG, OpenCLIP names)

The version is read from which text-encoder prefixes are present, as diffusers' single-file loader
does (diffusers.loaders.single_file_utils: CHECKPOINT_KEY_NAMES, infer_diffusers_model_type). Files of
another kind (the SDXL refiner, inpainting UNets, ControlNets, LoRAs, ...) are named and refused.
"""

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
XL_REFINER = "conditioner.embedders.0.model."  # the SDXL refiner has only bigG, at index 0
# Each version's text towers, as (prefix, the part they fill).
TEXT = {"SD 1.x": [(CLIP, "text_encoder")], "SD 2.x": [(OPENCLIP, "text_encoder")],
        "SDXL": [(XL_CLIP, "text_encoder"), (XL_OPENCLIP, "text_encoder_2")]}
# Buffers of the original training code's diffusion class, stored next to the weights (unused: minidb
# computes its schedule in minidb/schedulers.py). DDPM's for SD 1/2; sgm's DiscreteDenoiser for SDXL.
DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "denoiser.sigmas"}
# An empty tensor that marks a v-prediction model (ComfyUI's convention: supported_models.py, SDXL.model_type).
V_PRED_MARKER = "v_pred"
# Keys that mark SDXL variants with another noise schedule (ComfyUI's SDXL.model_type): not supported.
OTHER_SCHEDULES = {"edm_mean": "Playground v2.5 (an EDM model)", "edm_vpred.sigma_max": "an EDM v-prediction SDXL model",
                   "ztsnr": "an SDXL model with a zero-terminal-SNR schedule (ztsnr)"}
# UNet input channels other than 4: latents plus a mask and masked image, an image, a depth map.
SPECIAL_INPUTS = {9: "an inpainting model", 8: "an InstructPix2Pix model", 7: "an x4 upscaler", 5: "a depth-to-image model"}


def version(keys):
    """"SD 1.x", "SD 2.x" or "SDXL" from which text prefixes the keys use, or None."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "SDXL"
    if any(k.startswith(OPENCLIP) for k in keys):
        return "SD 2.x"
    return "SD 1.x" if any(k.startswith(CLIP) for k in keys) else None


def unsupported(tensors):
    """What kind of unsupported file this is, or None if it looks like SD 1.x / 2.x / XL."""
    keys = list(tensors)
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet"
    if any("lora_" in k for k in keys):
        return "a LoRA, not a full model"
    if set(keys) in ({"emb_params"}, {"clip_l", "clip_g"}) or any(k.startswith("string_to_param") for k in keys):
        return "a textual-inversion embedding, not a full model"
    if any(k.startswith(XL_REFINER) for k in keys):
        return "the SDXL refiner (its only text encoder is OpenCLIP-bigG, at conditioner.embedders.0.model.*)"
    kind = next((words for key, words in OTHER_SCHEDULES.items() if key in tensors), None)
    if kind:
        return kind
    if not any(k.startswith(UNET) for k in keys):
        if "encoder.conv_in.weight" in tensors or VAE + "encoder.conv_in.weight" in tensors:
            return "a standalone VAE, not a full model"
        if "conv_in.weight" in tensors:
            return "a bare diffusers UNet file (pass the whole diffusers folder instead)"
        return "not a Stable Diffusion checkpoint (it has no model.diffusion_model.* tensors)"
    xl = version(keys) == "SDXL"
    # A UNet without its first conv is a damaged model, not another kind: minidb/detect.py names it.
    first = tensors.get(UNET + "input_blocks.0.0.weight")
    in_ch = 4 if first is None else first.shape[1]
    if in_ch != 4:
        kind = SPECIAL_INPUTS.get(in_ch, f"a UNet with {in_ch} input channels")
        return "an SDXL " + kind.split(" ", 1)[1] if xl else kind
    if UNET + "label_emb.0.0.weight" in tensors and not xl:
        return "an unCLIP (image variation) model"
    if not any(k.startswith(VAE) for k in keys):
        return "a UNet without a VAE (no first_stage_model.* tensors)"
    if xl:
        missing = [(name, prefix) for prefix, name in ((XL_CLIP, "CLIP-L"), (XL_OPENCLIP, "OpenCLIP-bigG"))
                   if not any(k.startswith(prefix) for k in keys)]
        if missing:
            return f"a partial SDXL checkpoint (it lacks the {missing[0][0]} text encoder, {missing[0][1]}*)"
    elif version(keys) is None:
        return "a UNet without a text encoder (no cond_stage_model.* tensors)"
    return None


def is_known_extra(key):
    """Tensors that real files carry besides the weights SD runs: EMA copies, schedule buffers, CLIP's
    position ids, the v-prediction marker."""
    return (key.startswith("model_ema.") or key in DDPM_BUFFERS or key == V_PRED_MARKER
            or key.endswith("embeddings.position_ids"))


def split(tensors, version):
    """{part: its tensors without the prefix}, for "unet", "vae" and the version's text towers, and the
    keys that belong to none of them. CLIP towers lose their `text_model.` prefix (minidb's names)."""
    parts = {"unet": UNET, "vae": VAE, **{name: prefix for prefix, name in TEXT[version]}}
    out = {name: {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
           for name, prefix in parts.items()}
    for prefix, name in TEXT[version]:
        if prefix in (CLIP, XL_CLIP):
            out[name] = {k.removeprefix("text_model."): t for k, t in out[name].items() if not is_known_extra(k)}
    leftover = [k for k in tensors if not k.startswith(tuple(parts.values())) and not is_known_extra(k)]
    return out, leftover
