"""End-to-end parity: minidb's sampling pipeline against diffusers' StableDiffusionPipeline.

Tiny random SD 1.x-style (ε) and SD 2.x-style (v-prediction) models are built and saved by diffusers;
both pipelines run from that folder with the same seed, prompt, negative prompt and guidance, with
each sampler. A diffusers user switches samplers with XScheduler.from_config(pipe.scheduler.config)
on the public SD repos' scheduler config, which names no timestep spacing, so each scheduler uses its
own default; that is what the reference does here.
"""

import numpy as np
import pytest
import torch

from conftest import diffusers
from minidb.load import load
from minidb.pipeline import decode, sample_latents
from test_load_save import PRED, reference_pipeline
from test_schedulers import SD_SCHEDULER_CONFIG

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module", params=["SD 1.x", "SD 2.x"])
def saved(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    reference_pipeline(request.param, tmp).save_pretrained(tmp / "model")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp / "model", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return request.param, ref, load(tmp / "model")


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_same_seed_same_image_as_diffusers(saved, sampler):
    family, ref, model = saved
    ref.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(SD_SCHEDULER_CONFIG, prediction_type=PRED[family])
    settings = dict(prompt="a photo of sks dog on the beach", negative_prompt="blurry", steps=8, guidance=6.0,
                    seed=1234, height=32, width=40, n=2)

    def reference(output_type):
        return ref(settings["prompt"], negative_prompt=settings["negative_prompt"], height=32, width=40,
                   num_inference_steps=8, guidance_scale=6.0, num_images_per_prompt=2, output_type=output_type,
                   generator=torch.Generator("cpu").manual_seed(1234)).images

    latents = sample_latents(model, sampler=sampler, progress=False, **settings)
    ref_latents = reference("latent")
    assert latents.shape == ref_latents.shape == (2, 4, 16, 20)  # the tiny VAE downsamples 2x
    err = (latents - ref_latents).abs().max().item()
    assert err < 1e-4 * ref_latents.abs().max().item(), f"latents differ by {err}"

    images = np.stack([np.asarray(im) for im in decode(model, latents)]).astype(np.float64)
    ref_images = (reference("np") * 255).round()  # as diffusers rounds for its PIL output
    assert images.shape == ref_images.shape == (2, 32, 40, 3)
    assert np.abs(images - ref_images).mean() < 0.1  # in 8-bit levels: well under 1/255
    assert np.abs(images - ref_images).max() <= 2


def test_guidance_one_skips_the_unconditional_pass(saved):
    family, ref, model = saved
    ref.scheduler = diffusers.DDIMScheduler.from_config(SD_SCHEDULER_CONFIG, prediction_type=PRED[family])
    latents = sample_latents(model, "a cat", guidance=1.0, steps=4, seed=7, height=32, width=32, progress=False)
    ref_latents = ref("a cat", guidance_scale=1.0, num_inference_steps=4, height=32, width=32, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(7)).images
    assert torch.allclose(latents, ref_latents, atol=1e-5)


def test_prompt_matters_and_seed_matters(saved):
    # guard against a pipeline that ignores its inputs and still "matches"
    _, _, model = saved
    kw = dict(steps=4, height=32, width=32, progress=False)
    a = sample_latents(model, "a cat", seed=1, **kw)
    assert not torch.allclose(a, sample_latents(model, "a dog", seed=1, **kw))
    assert not torch.allclose(a, sample_latents(model, "a cat", seed=2, **kw))
    assert torch.equal(a, sample_latents(model, "a cat", seed=1, **kw))
