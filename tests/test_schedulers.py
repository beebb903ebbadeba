"""Parity of minidb.schedulers with diffusers' DDPMScheduler and DDIMScheduler, as SD users build them.

A diffusers user switches samplers with XScheduler.from_config(pipe.scheduler.config); for SD 1.5 that
config describes a PNDMScheduler and names no timestep_spacing, so each scheduler's own defaults fill the
gaps. The references below are built exactly that way, offline, from a copy of that config.
The schedules and every sampling step must agree bit for bit in float32.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from minidb.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule, leading_timesteps

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (SD 2.x differs only in prediction_type)
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
PREDICTION_TYPES = ["epsilon", "v_prediction"]


def reference(cls, prediction_type="epsilon"):
    return cls.from_config(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)


def fake_unet(x, t):
    """A deterministic stand-in for the UNet that depends on both x and t, so any mix-up of timesteps shows."""
    return 0.8 * torch.tanh(x) + 0.3 * torch.cos(x * (1 + t.float() / 1000))


def assert_bit_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    assert torch.equal(ours, theirs), f"{what}: max abs diff {(ours - theirs).abs().max().item():.3e}"


def test_reference_config_is_what_sd_users_get():
    # Guards our assumptions about diffusers' defaults: if one changes, "matching diffusers" changes too.
    ddpm, ddim = reference(DDPMScheduler), reference(DDIMScheduler)
    for scheduler in (ddpm, ddim):
        assert scheduler.config.timestep_spacing == "leading"
        assert scheduler.config.steps_offset == 1
        assert not scheduler.config.clip_sample and not scheduler.config.thresholding
        assert scheduler.init_noise_sigma == 1.0  # so the pipeline needs no initial-noise scaling for these two
    assert ddpm.config.variance_type == "fixed_small"
    assert not ddim.config.set_alpha_to_one
    # The example from the design notes, written out by hand.
    assert leading_timesteps(7).tolist() == [853, 711, 569, 427, 285, 143, 1]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_schedule_is_bit_equal(cls):
    ref, ours = reference(cls), NoiseSchedule()
    assert_bit_equal(ours.betas, ref.betas, "betas")
    assert_bit_equal(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_add_noise_and_training_target(prediction_type):
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 999, 1, 500, 250, 998, 37])  # batched: every sample at its own timestep
    x0 = torch.randn(len(t), 4, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ref, ours = reference(DDPMScheduler, prediction_type), NoiseSchedule(prediction_type)

    assert_bit_equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), "add_noise")
    expected = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    assert_bit_equal(ours.target(x0, noise, t), expected, "target")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_and_eps_invert_the_training_target(prediction_type):
    # Independent of diffusers: a model that outputs the exact training target must give back x_0 and ε.
    gen = torch.Generator().manual_seed(1)
    schedule = NoiseSchedule(prediction_type)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for step in (0, 1, 500, 999):
        t = torch.full((2,), step)
        x_t = schedule.add_noise(x0, noise, t)
        x0_hat, eps_hat = schedule.x0_and_eps(schedule.target(x0, noise, t), x_t, t[0])
        # x̂_0 divides by √ᾱ_t (0.068 at t=999) for epsilon models, which amplifies float32 rounding
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 50, 999])
@pytest.mark.parametrize("sampler_cls, reference_cls", [(DDPMSampler, DDPMScheduler), (DDIMSampler, DDIMScheduler)])
def test_timesteps(sampler_cls, reference_cls, num_steps):
    ref, ours = reference(reference_cls), sampler_cls()
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert_bit_equal(ours.timesteps, ref.timesteps, "timesteps")


def test_1000_steps_is_a_clear_error():
    # "leading" + steps_offset 1 at 1000 steps would start at t = 1000, one past the last trained timestep.
    # diffusers accepts it and then fails inside step(); minidb says so up front.
    ref = reference(DDIMScheduler)
    ref.set_timesteps(1000)
    assert ref.timesteps[0] == 1000
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(IndexError):
        ref.step(x, ref.timesteps[0], x)
    for sampler in (DDPMSampler(), DDIMSampler()):
        with pytest.raises(ValueError, match="between 1 and 999"):
            sampler.set_timesteps(1000)


def run_both(ours, ref, num_steps, step_ref):
    """Drive both samplers with the same fake model from the same start; compare after every step."""
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    gen_ours, gen_ref = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    x_start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x_ours, x_ref = x_start, x_start.clone()
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        out_ours, out_ref = fake_unet(x_ours, t), fake_unet(x_ref, t_ref)
        x0_ours, _ = ours.x0_and_eps(out_ours, x_ours, t)
        x_ours = ours.step(out_ours, t, x_ours, gen_ours)
        result = step_ref(ref, out_ref, t_ref, x_ref, gen_ref)
        x_ref = result.prev_sample
        assert_bit_equal(x0_ours, result.pred_original_sample, f"x0 at step {i} (t={t.item()})")
        assert_bit_equal(x_ours, x_ref, f"sample after step {i} (t={t.item()})")
    # Both generators must have been advanced identically (or both left alone).
    assert torch.equal(torch.randn(3, generator=gen_ours), torch.randn(3, generator=gen_ref))
    assert not torch.allclose(x_ours, x_start)  # the loop did something


@pytest.mark.parametrize("num_steps", [1, 7, 50, 999])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_matches_diffusers(prediction_type, num_steps):
    def step_ref(ref, out, t, x, gen):
        return ref.step(out, t, x, generator=gen)

    run_both(DDPMSampler(prediction_type), reference(DDPMScheduler, prediction_type), num_steps, step_ref)


@pytest.mark.parametrize("num_steps", [1, 7, 50])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_matches_diffusers(prediction_type, eta, num_steps):
    def step_ref(ref, out, t, x, gen):
        return ref.step(out, t, x, eta=eta, generator=gen)

    run_both(DDIMSampler(prediction_type, eta=eta), reference(DDIMScheduler, prediction_type), num_steps, step_ref)


def test_ddim_eta_changes_the_result():
    # Guards the DDIM test above against an eta that is silently ignored.
    results = []
    for eta in (0.0, 1.0):
        sampler = DDIMSampler(eta=eta)
        sampler.set_timesteps(7)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(4)
        for t in sampler.timesteps:
            x = sampler.step(fake_unet(x, t), t, x, gen)
        results.append(x)
    assert not torch.allclose(results[0], results[1])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule("sample")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-0.1)
    with pytest.raises(ValueError, match="between 1 and 999"):
        DDPMSampler().set_timesteps(0)
