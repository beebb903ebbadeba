"""Parity of minidb.samplers with diffusers' Euler, Euler ancestral and DPM-Solver++ schedulers, as SD users build them.

A diffusers user switches samplers with XScheduler.from_config(pipe.scheduler.config); SD's config describes a
PNDMScheduler and names no timestep_spacing, so each scheduler's own defaults apply ("linspace" here, unlike
DDIM's "leading"). The references are built exactly that way, offline, from a copy of that config.
Timesteps, σ tables, the input scaling and every sampling step must agree bit for bit in float32.
"""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from minidb.samplers import DPMSolverPP2MSampler, EulerAncestralSampler, EulerSampler
from test_schedulers import PREDICTION_TYPES, SD_SCHEDULER_CONFIG, assert_bit_equal, fake_unet

PAIRS = {
    "euler": (EulerSampler, EulerDiscreteScheduler),
    "euler-ancestral": (EulerAncestralSampler, EulerAncestralDiscreteScheduler),
    "dpm++2m": (DPMSolverPP2MSampler, DPMSolverMultistepScheduler),
}
# diffusers' schedulers call np.array() on a torch tensor, which numpy 2 warns about once per set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# huggingface.co/stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json: it names its
# spacing, "leading", so every scheduler built from it uses that, and minidb's samplers with spacing="leading".
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
CONFIGS = {"SD": (SD_SCHEDULER_CONFIG, "linspace"), "SDXL": (SDXL_SCHEDULER_CONFIG, "leading")}


def reference(cls, prediction_type="epsilon", family="SD"):
    return cls.from_config(CONFIGS[family][0], prediction_type=prediction_type)


def ours_for(cls, prediction_type="epsilon", family="SD"):
    return cls(prediction_type, spacing=CONFIGS[family][1])


def test_reference_config_is_what_sd_users_get():
    # Guards our assumptions about diffusers' defaults: if one changes, "matching diffusers" changes too.
    euler, ancestral, dpm = (reference(cls) for _, cls in PAIRS.values())
    for scheduler in (euler, ancestral, dpm):
        assert scheduler.config.timestep_spacing == "linspace"
        assert not scheduler.config.rescale_betas_zero_snr
    for scheduler in (euler, dpm):
        assert scheduler.config.final_sigmas_type == "zero"
        assert not (scheduler.config.use_karras_sigmas or scheduler.config.use_exponential_sigmas
                    or scheduler.config.use_beta_sigmas)
    assert euler.config.interpolation_type == "linear" and euler.config.timestep_type == "discrete"
    assert (dpm.config.algorithm_type, dpm.config.solver_order, dpm.config.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert dpm.config.lower_order_final and not dpm.config.euler_at_final and not dpm.config.thresholding
    assert not (dpm.config.use_lu_lambdas or dpm.config.use_flow_sigmas) and dpm.config.variance_type is None
    assert dpm.config.lambda_min_clipped == -float("inf")
    # The examples from the module docstring, written out by hand.
    euler, dpm = EulerSampler(), DPMSolverPP2MSampler()
    euler.set_timesteps(7)
    dpm.set_timesteps(7)
    assert euler.timesteps.tolist() == [999, 832.5, 666, 499.5, 333, 166.5, 0]
    assert dpm.timesteps.tolist() == [999, 856, 714, 571, 428, 285, 143]
    assert dpm.init_noise_sigma == 1.0
    euler.set_timesteps(1)  # diffusers' quirk, kept: numpy.linspace(0, 999, 1) is [0]
    assert euler.timesteps.tolist() == [0]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_timesteps_sigmas_and_initial_noise_at_every_step_count(name, family):
    # Every step count, since rounding (DPM++: half to even) and interpolation go wrong at particular n.
    sampler_cls, reference_cls = PAIRS[name]
    ours, ref = ours_for(sampler_cls, family=family), reference(reference_cls, family=family)
    for num_steps in range(1, 1000):
        ours.set_timesteps(num_steps)
        ref.set_timesteps(num_steps)
        assert_bit_equal(ours.timesteps, ref.timesteps, f"timesteps at n={num_steps}")
        assert_bit_equal(ours.sigmas, ref.sigmas, f"sigmas at n={num_steps}")
        if isinstance(ref.init_noise_sigma, torch.Tensor):
            assert_bit_equal(ours.init_noise_sigma, ref.init_noise_sigma, f"init_noise_sigma at n={num_steps}")
        else:
            assert ours.init_noise_sigma == ref.init_noise_sigma


def run_both(ours, ref, num_steps, dtype=torch.float32, seed=42, size=8):
    """Drive both samplers through the loop of minidb/pipeline.py with the same fake model; compare at every step."""
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    assert_bit_equal(ours.timesteps, ref.timesteps, "timesteps")
    gen_ours, gen_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(7))
    x_ours = (noise * ours.init_noise_sigma).to(dtype)
    x_ref = (noise * ref.init_noise_sigma).to(dtype)
    assert_bit_equal(x_ours, x_ref, "initial noise")
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        x_in = ours.scale_model_input(x_ours, t)
        x_in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_bit_equal(x_in, x_in_ref, f"model input at step {i} (t={t.item()})")
        x_ours = ours.step(fake_unet(x_in, t).to(dtype), t, x_ours, gen_ours)
        x_ref = ref.step(fake_unet(x_in_ref, t_ref).to(dtype), t_ref, x_ref, generator=gen_ref).prev_sample
        assert_bit_equal(x_ours, x_ref, f"sample after step {i} (t={t.item()})")
    # Both generators advanced identically (Euler and DPM++ leave theirs alone, the ancestral one draws every step).
    assert torch.equal(torch.randn(3, generator=gen_ours), torch.randn(3, generator=gen_ref))
    assert torch.isfinite(x_ours).all() and not torch.allclose(x_ours.float(), noise)  # the loop did something
    return x_ours


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 25, 50])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_sampling_loop_matches_diffusers(name, family, prediction_type, num_steps):
    sampler_cls, reference_cls = PAIRS[name]
    run_both(ours_for(sampler_cls, prediction_type, family), reference(reference_cls, prediction_type, family), num_steps)


def test_sdxl_spacing_examples():
    # The module docstring's examples, by hand: "leading" timesteps and Euler's larger first noise.
    euler, dpm = EulerSampler(spacing="leading"), DPMSolverPP2MSampler(spacing="leading")
    euler.set_timesteps(7)
    dpm.set_timesteps(7)
    assert euler.timesteps.tolist() == [853, 711, 569, 427, 285, 143, 1]
    assert dpm.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126]
    assert euler.init_noise_sigma == (euler.sigmas.max() ** 2 + 1) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(PAIRS))
def test_half_precision_casts_match_diffusers(name, dtype):
    # Samples and model outputs in half precision, as on a GPU: diffusers steps in float32 and casts back,
    # and which operations happen in which dtype decides the bits.
    sampler_cls, reference_cls = PAIRS[name]
    x = run_both(sampler_cls("v_prediction"), reference(reference_cls, "v_prediction"), 7, dtype)
    assert x.dtype == dtype


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_sampler_can_be_reused(name):
    # set_timesteps starts afresh: DPM++'s memory of the previous x̂_0 must not leak into the next image,
    # even one of another size.
    sampler_cls, reference_cls = PAIRS[name]
    ours, ref = sampler_cls(), reference(reference_cls)
    first = run_both(ours, ref, 7)
    run_both(ours, ref, 4, size=6)
    again = run_both(ours, ref, 7)
    assert torch.equal(first, again)


def test_ancestral_noise_comes_from_the_generator():
    # Guards the seeded comparison above: a different seed must give a different image.
    results = []
    for seed in (0, 1):
        ours, ref = EulerAncestralSampler(), reference(EulerAncestralDiscreteScheduler)
        results.append(run_both(ours, ref, 7, seed=seed))
    assert not torch.allclose(results[0], results[1])


def test_dpm_second_order_steps_matter():
    # Guards the multistep part: without the previous x̂_0 (first order throughout) the result must change.
    ref = reference(DPMSolverMultistepScheduler)
    first_order = DPMSolverMultistepScheduler.from_config(ref.config, solver_order=1)
    first_order.set_timesteps(7)
    ours = DPMSolverPP2MSampler()
    ours.set_timesteps(7)
    x_ours = x_ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for t in ours.timesteps:
        x_ours = ours.step(fake_unet(x_ours, t), t, x_ours)
        x_ref = first_order.step(fake_unet(x_ref, t), t, x_ref).prev_sample
    assert not torch.allclose(x_ours, x_ref)


def test_bad_arguments_are_rejected():
    # diffusers' DPM++ at 1000 steps rounds two timesteps to the same value; minidb stops at 999 for all three.
    ref = reference(DPMSolverMultistepScheduler)
    ref.set_timesteps(1000)
    assert len(ref.timesteps.unique()) < 1000
    for sampler_cls, _ in PAIRS.values():
        sampler = sampler_cls()
        for num_steps in (0, 1000):
            with pytest.raises(ValueError, match="between 1 and 999"):
                sampler.set_timesteps(num_steps)
        sampler.set_timesteps(7)
        x = torch.zeros(1, 4, 2, 2)
        with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
            sampler.step(x, torch.tensor(500.25), x)
        with pytest.raises(ValueError, match="prediction_type"):
            sampler_cls("sample")
