"""SDXL text to image: minidb's pipeline against diffusers' StableDiffusionXLPipeline on a tiny SDXL-shaped
model with the same random weights, with every sampler built from SDXL's scheduler config ("leading"
spacing), with and without a negative prompt (no negative prompt: zeros, as force_zeros_for_empty_prompt)."""

import numpy as np
import pytest
import torch

from conftest import diffusers, diffusers_unet, diffusers_vae, text_twin, transformers, twin, unet_twin, vae_twin
from minidb import text_encoder as te, vae as va
from minidb.load import StableDiffusion
from minidb.pipeline import decode, encode_prompt, sample_latents
from minidb.tokenizer import Tokenizer
from test_samplers import SDXL_SCHEDULER_CONFIG
from test_sdxl import TINY_G, TINY_L, TINY_SDXL_UNET, reference_text

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler"}
TINY_XL_VAE = va.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=va.LATENT_SCALE_XL)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers' tiny StableDiffusionXLPipeline, minidb's model sharing its weights)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    Tokenizer.for_version("SD 1.x").save(tmp / "tok")
    Tokenizer.for_version("SD 2.x").save(tmp / "tok2")  # SDXL's second tokenizer pads with "!" (id 0)
    unet, vae = diffusers_unet(TINY_SDXL_UNET), diffusers_vae(TINY_XL_VAE)
    text, text_2 = reference_text(TINY_L, seed=3), reference_text(TINY_G, seed=4)
    ref = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, unet=unet,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp / "tok"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tmp / "tok2"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusion(
        Tokenizer.for_version("SD 1.x"), text_twin(text, TINY_L), vae_twin(vae, TINY_XL_VAE),
        unet_twin(unet, TINY_SDXL_UNET), "SDXL", "epsilon", tokenizer_2=Tokenizer.for_version("SD 2.x"),
        text_encoder_2=twin(te.TextEncoder, TINY_G, {k.removeprefix("text_model."): v for k, v in text_2.state_dict().items()}))
    return ref, ours


def test_prompt_encoding_equals_diffusers(pair):
    ref, ours = pair
    context, pooled = encode_prompt(ours, ["a photo of sks dog"])
    ref_context, _, ref_pooled, _ = ref.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False)
    assert context.shape == (1, 77, 48) and pooled.shape == (1, 16)
    assert torch.allclose(context, ref_context, atol=1e-6) and torch.allclose(pooled, ref_pooled, atol=1e-6)


@pytest.mark.parametrize("negative", [None, "blurry"], ids=["no negative", "negative"])
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_same_seed_same_image_as_diffusers(pair, sampler, negative):
    ref, ours = pair
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(SDXL_SCHEDULER_CONFIG)
    kw = dict(height=32, width=40, guidance=5.0, steps=6, seed=1234, n=2)
    latents = sample_latents(ours, "a photo of sks dog on the beach", negative or "", sampler=sampler, progress=False, **kw)

    def reference(output_type):
        return ref("a photo of sks dog on the beach", negative_prompt=negative, height=32, width=40, guidance_scale=5.0,
                   num_inference_steps=6, num_images_per_prompt=2, output_type=output_type,
                   generator=torch.Generator("cpu").manual_seed(1234)).images

    ref_latents = reference("latent")
    assert latents.shape == ref_latents.shape == (2, 4, 16, 20)
    err = (latents - ref_latents).abs().max().item()
    assert err < 1e-4 * ref_latents.abs().max().item(), f"latents differ by {err}"
    images = np.stack([np.asarray(im) for im in decode(ours, latents)]).astype(np.float64)
    ref_images = (reference("np") * 255).round()
    assert np.abs(images - ref_images).mean() < 0.1 and np.abs(images - ref_images).max() <= 2


def test_the_prompt_and_the_negative_prompt_matter(pair):
    # guards the comparisons above against a pipeline that ignores its text
    _, ours = pair
    kw = dict(steps=3, seed=1, guidance=5.0, height=32, width=32, progress=False)
    base = sample_latents(ours, "a cat", **kw)
    assert not torch.allclose(base, sample_latents(ours, "a cat", "blurry", **kw))
    assert not torch.allclose(base, sample_latents(ours, "a dog", **kw))
