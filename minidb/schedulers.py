"""The noise schedule of Stable Diffusion, and the DDPM and DDIM samplers that run it backwards.

Notation: t is a timestep in 0..999, ᾱ_t = ∏_{s≤t} (1 − β_s) ("alphas_cumprod"), ε ~ N(0, I).

Training (forward process, any t, batched):
    x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε
    the UNet learns to predict ε ("epsilon": SD 1.x, SD 2.x base)
    or v = √ᾱ_t · ε − √(1−ᾱ_t) · x_0 ("v_prediction": SD 2.x 768; Salimans & Ho 2022, arXiv 2202.00512)

Sampling turns the model output at x_t into a guess of x_0 and of ε:
    epsilon:      x̂_0 = (x_t − √(1−ᾱ_t) · ε̂) / √ᾱ_t
    v_prediction: x̂_0 = √ᾱ_t · x_t − √(1−ᾱ_t) · v̂,   ε̂ = √ᾱ_t · v̂ + √(1−ᾱ_t) · x_t
and then steps from t to the previous sampler timestep s < t, with z ~ N(0, I):
    DDPM (Ho et al. 2020, arXiv 2006.11239, eq. 7), with α = ᾱ_t / ᾱ_s and β = 1 − α:
        x_s = √ᾱ_s·β/(1−ᾱ_t) · x̂_0 + √α·(1−ᾱ_s)/(1−ᾱ_t) · x_t + √((1−ᾱ_s)/(1−ᾱ_t)·β) · z
    DDIM (Song et al. 2020, arXiv 2010.02502, eqs. 12 and 16), η = 0 is deterministic:
        σ = η · √((1−ᾱ_s)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_s))
        x_s = √ᾱ_s · x̂_0 + √(1−ᾱ_s−σ²) · ε̂ + σ · z

Every number here equals diffusers' DDPMScheduler / DDIMScheduler built from SD's scheduler config,
bit for bit in float32, so the same seed gives the same image in minidb and in diffusers.
"""
import torch

# Stable Diffusion's schedule: `timesteps: 1000`, `linear_start: 0.00085`, `linear_end: 0.0120` in CompVis'
# configs/stable-diffusion/v1-inference.yaml (the same in Stability's v2-inference.yaml), with "linear"
# meaning linspace(√start, √end)², as in ldm/modules/diffusionmodules/util.py make_beta_schedule.
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# `"steps_offset": 1` in SD's scheduler_config.json; CompVis' make_ddim_timesteps adds the same 1
# "to get the final alpha values right". It shifts every sampler timestep up by one: ..., 21, 1.
STEPS_OFFSET = 1


class NoiseSchedule:
    """The fixed forward process, plus what training needs from it: noisy inputs and regression targets."""

    def __init__(self, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
        self.prediction_type = prediction_type
        # float32 throughout, as diffusers does (CompVis builds the same numbers in float64, then casts
        # to float32; ᾱ differs from ours by at most 5e-7). Kept on the CPU and moved where needed.
        self.betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def _scales(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """√ᾱ_t and √(1−ᾱ_t) for a batch of timesteps t (B,), shaped (B, 1, 1, 1) to scale x (B, C, H, W)."""
        alpha_bar = self.alphas_cumprod.to(x.device)[t.to(x.device)].reshape(-1, *[1] * (x.ndim - 1))
        # square roots in float32, then cast: 1−ᾱ_t is as small as 0.00085 and float16 would round it badly
        return alpha_bar.sqrt().to(x.dtype), (1 - alpha_bar).sqrt().to(x.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, each sample of the batch at its own timestep t (B,)."""
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._scales(t, x0)
        return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output for add_noise(x0, noise, t): ε itself, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0."""
        if self.prediction_type == "epsilon":
            return noise
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._scales(t, x0)
        return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0

    def x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's guesses of x_0 and of ε at one sampling timestep t (an int or a 0-d tensor).

        The scales stay 0-d float32 tensors, as in diffusers, so they never change x_t's dtype.
        """
        alpha_bar = self.alphas_cumprod[t]
        one_minus_alpha_bar = 1 - alpha_bar
        if self.prediction_type == "epsilon":
            x0 = (x_t - one_minus_alpha_bar**0.5 * model_output) / alpha_bar**0.5
            return x0, model_output
        x0 = alpha_bar**0.5 * x_t - one_minus_alpha_bar**0.5 * model_output
        eps = alpha_bar**0.5 * model_output + one_minus_alpha_bar**0.5 * x_t
        return x0, eps


def leading_timesteps(num_steps: int) -> torch.Tensor:
    """SD's sampler timesteps, "leading" spacing: k·(1000 // n) + 1 for k = n−1, ..., 0; e.g. n=7: 853, 711, ..., 1.

    "leading" is the default of diffusers' DDPM/DDIM schedulers, and SD's config names no other.
    """
    if not 1 <= num_steps < NUM_TRAIN_TIMESTEPS:
        # With steps_offset 1, 1000 steps would start at t = 1000, past the last trained timestep
        # (diffusers accepts the number, then fails in step() with an IndexError).
        raise ValueError(f"The number of sampling steps must be between 1 and 999, not {num_steps}.")
    step_ratio = NUM_TRAIN_TIMESTEPS // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * step_ratio + STEPS_OFFSET


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn as diffusers' randn_tensor draws it: on the generator's device
    (a CPU generator gives the same numbers whichever device x lives on), then moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler(NoiseSchedule):
    """What the sampling loop sees of every sampler:

        sampler.set_timesteps(n)
        x = noise * sampler.init_noise_sigma
        for t in sampler.timesteps:
            x = sampler.step(unet(sampler.scale_model_input(x, t), t, context), t, x, generator)

    DDPM and DDIM (and DPM-Solver++) work on x_t itself, so the scaling is the identity. The Euler
    samplers work on x / √ᾱ_t and start from noise of std σ_max (minidb/samplers.py): they override both.
    """

    init_noise_sigma = 1.0

    def __init__(self, prediction_type: str = "epsilon", spacing: str = "leading"):
        # "leading" (DDPM and DDIM always; every sampler with SDXL's config) or "linspace" (the Euler and
        # DPM-Solver samplers with SD 1.x/2.x's config, which names none: minidb/samplers.py)
        if spacing not in ("leading", "linspace"):
            raise ValueError(f"spacing must be 'leading' or 'linspace', not {spacing!r}.")
        super().__init__(prediction_type)
        self.spacing = spacing

    def set_timesteps(self, num_steps: int) -> None:
        self.timesteps = leading_timesteps(num_steps)  # (num_steps,) int64, descending
        self.step_ratio = NUM_TRAIN_TIMESTEPS // num_steps

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020): each step draws x_s from the Gaussian posterior q(x_s | x_t, x̂_0).

    Equals diffusers' DDPMScheduler.from_config(SD's scheduler config): variance "fixed_small", no clipping.
    """

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator: torch.Generator | None = None):
        """x_t -> x_s, where s is the next entry of self.timesteps; call set_timesteps(n) first."""
        prev_t = t - self.step_ratio
        alpha_bar = self.alphas_cumprod[t]
        # The last step (t = 1) jumps to the clean image, ᾱ = 1. DDPMScheduler does this at every step
        # count; unlike DDIM below it has no set_alpha_to_one option.
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 1 else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev  # the α of one combined jump t -> s
        beta = 1 - alpha
        x0, _ = self.x0_and_eps(model_output, x_t, t)
        # the posterior mean is a blend of the guess x̂_0 and the current sample x_t
        x0_coef = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        x_t_coef = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = x0_coef * x0 + x_t_coef * x_t
        # Noise is drawn at every step, the last one included, where the variance is 0 and diffusers'
        # clamp to 1e-20 adds 1e-10·z: this keeps a seeded generator in step with diffusers.
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).clamp(min=1e-20)
        return mean + variance**0.5 * noise_like(model_output, generator)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2020): jump straight towards x̂_0 and re-noise with ε̂; eta=0 is deterministic.

    Equals diffusers' DDIMScheduler.from_config(SD's scheduler config) with step(..., eta=eta): no clipping,
    set_alpha_to_one False. eta is fixed here so that every sampler steps with the same call.
    """

    def __init__(self, prediction_type: str = "epsilon", eta: float = 0.0, spacing: str = "leading"):
        super().__init__(prediction_type, spacing)
        if eta < 0:
            raise ValueError(f"eta must be 0 (deterministic DDIM) or positive, not {eta}.")
        self.eta = eta

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, generator: torch.Generator | None = None):
        """x_t -> x_s with s = t − 1000 // n; call set_timesteps(n) first."""
        prev_t = t - self.step_ratio
        alpha_bar = self.alphas_cumprod[t]
        # set_alpha_to_one False: the last step lands on ᾱ_0 (t = 0), not on ᾱ = 1 as DDPM does.
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.alphas_cumprod[0]
        x0, eps = self.x0_and_eps(model_output, x_t, t)
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar)) * (1 - alpha_bar / alpha_bar_prev)
        sigma = self.eta * variance**0.5
        x_prev = alpha_bar_prev**0.5 * x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
        if self.eta > 0:  # only then is noise drawn, so eta=0 leaves a generator untouched, as in diffusers
            x_prev = x_prev + sigma * noise_like(model_output, generator)
        return x_prev
