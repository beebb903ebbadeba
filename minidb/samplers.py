"""Euler, Euler ancestral and DPM-Solver++ (2M): samplers that see diffusion as an ODE in the noise level σ.

Notation as in minidb/schedulers.py: ᾱ_t at timestep t, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, ε ~ N(0, I).

Divide x_t by √ᾱ_t and the process becomes "variance exploding" (Karras et al. 2022, arXiv 2206.00364):
    x̃ = x_t / √ᾱ_t = x_0 + σ·ε,   σ_t = √((1−ᾱ_t)/ᾱ_t)     (σ runs from 0.029 at t=0 to 14.6 at t=999)
The UNet was trained on x_t, so it gets x̃ / √(σ²+1) = x_t ("scale_model_input"). Its output gives
    epsilon:      x̂_0 = x̃ − σ·ε̂
    v_prediction: x̂_0 = x̃/(σ²+1) − σ/√(σ²+1) · v̂    (that is √ᾱ·x_t − √(1−ᾱ)·v̂, in σ)
and sampling integrates the probability-flow ODE dx̃/dσ = (x̃ − x̂_0)/σ (= ε̂) from σ_max down to 0:
    Euler:           x̃' = x̃ + (σ' − σ)·(x̃ − x̂_0)/σ
    Euler ancestral: split the next level σ' into a deterministic part and fresh noise,
                         σ_up = √(σ'²(σ² − σ'²)/σ²),   σ_down = √(σ'² − σ_up²)
                     then x̃' = Euler step to σ_down + σ_up·z, z ~ N(0, I).
    Both as in k-diffusion's sample_euler / sample_euler_ancestral (github.com/crowsonkb/k-diffusion).
The sample starts as x̃_T = x_0 + σ_max·ε ≈ σ_max·ε, so "init_noise_sigma" is σ_max.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, "2M") works on x_t itself, with
α = √ᾱ = 1/√(σ²+1), s = √(1−ᾱ) = σ·α, and the half log-SNR λ = log α − log s = −log σ.
Between two levels, with h = λ' − λ (the step in λ), the exact solution given a constant x̂_0 is
    x' = (s'/s)·x − α'·(e^(−h) − 1)·x̂_0                                        (first order)
and the multistep version replaces x̂_0 by a linear extrapolation from the previous step's x̂_0_prev:
    r = h_prev / h,   D = x̂_0 + (1/(2r))·(x̂_0 − x̂_0_prev)                       (second order)
The first step has no previous x̂_0 and the last one lands on σ' = 0 (λ' = +∞, e^(−h) = 0, so x' = x̂_0);
both are first order.

Every number equals diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and
DPMSolverMultistepScheduler built with XScheduler.from_config(SD's scheduler config), bit for bit in float32
(the same seed gives the same image). That config names no timestep_spacing, so these use their own default,
"linspace", not DDIM's "leading" (see leading_timesteps in minidb/schedulers.py):
    Euler, n = 7:  t = 999, 832.5, 666, ..., 0   fractional timesteps, σ linearly interpolated between
                                                 the 1000 trained levels (numpy.interp)
    DPM++, n = 7:  t = 999, 856, 714, ..., 143   round(999·k/n) for k = n..1; the last step goes to σ = 0
diffusers quirk kept: Euler with n = 1 gives t = [0] (numpy.linspace(0, 999, 1) is [0]), one step from σ = 0.029.

SDXL's scheduler config does name a spacing, "leading" with steps_offset 1, and every diffusers sampler built
from it uses that (spacing="leading" here):
    Euler, n = 7:  t = 853, 711, ..., 1          DDIM's timesteps; and the first noise is √(σ_max² + 1), not σ_max
    DPM++, n = 7:  t = 876, 751, ..., 126        k·(1000 // (n+1)) + 1 for k = n..1
"""
import torch

from minidb.schedulers import NUM_TRAIN_TIMESTEPS, STEPS_OFFSET, Sampler, leading_timesteps, noise_like


def linspace_timesteps(num_points: int) -> torch.Tensor:
    """numpy.linspace(0, 999, num_points) in float64, computed as numpy computes it: k · (999 / (num_points − 1)).

    torch.linspace uses another formula; its last-bit differences change round() at some step counts.
    (numpy also pins the end to exactly 999; here it may be off by 1e-13, which float32 and round() erase.)
    """
    return torch.arange(num_points, dtype=torch.float64) * ((NUM_TRAIN_TIMESTEPS - 1) / max(num_points - 1, 1))


def interpolate(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table (1000,) read at fractional timesteps t, linearly, in float64 as numpy.interp does; back to float32."""
    t = t.double()
    low = t.floor().long().clamp(max=len(table) - 2)  # t = 999 reads as table[998] + 1·(table[999] − table[998])
    table = table.double()
    return ((table[low + 1] - table[low]) * (t - low) + table[low]).float()


def index_of(t, timesteps: torch.Tensor) -> int:
    """Where timestep t sits in timesteps; diffusers finds its step index the same way."""
    hits = (timesteps == torch.as_tensor(t).to(timesteps.device)).nonzero()
    if len(hits) == 0:
        raise ValueError(f"t = {float(t)} is not one of this sampler's timesteps: call set_timesteps(n) first "
                         "and pass the values of sampler.timesteps.")
    return int(hits[0])


def check_num_steps(num_steps: int) -> None:
    # DPM++ rounds 999·k/n to integers, so beyond 999 steps two timesteps would coincide.
    if not 1 <= num_steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"The number of sampling steps must be between 1 and 999, not {num_steps}.")


class EulerSampler(Sampler):
    """Euler's method on the ODE in σ (Karras et al. 2022, Algorithm 1 without its second-order correction).

    Equals diffusers' EulerDiscreteScheduler.from_config(SD's or SDXL's scheduler config): "linspace" or
    "leading" spacing, linear σ interpolation, final σ 0, no churn (s_churn = 0).
    """

    def __init__(self, prediction_type: str = "epsilon", spacing: str = "linspace"):
        super().__init__(prediction_type, spacing)
        # σ at the 1000 trained timesteps, float32 as diffusers computes it
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def set_timesteps(self, num_steps: int) -> None:
        check_num_steps(num_steps)
        # (n,) float32, descending, fed to the UNet as they are (fractional with "linspace")
        linspace = self.spacing == "linspace"
        self.timesteps = (linspace_timesteps(num_steps).flip(0) if linspace else leading_timesteps(num_steps)).float()
        # (n + 1,) σ at each timestep, then 0: the last step lands on x̂_0
        self.sigmas = torch.cat([interpolate(self.train_sigmas, self.timesteps), torch.zeros(1)])
        # 0-d float32: σ of the first step; diffusers takes √(σ²+1) for "leading" (its x̃ then starts as x_t's scale)
        self.init_noise_sigma = self.sigmas.max() if linspace else (self.sigmas.max() ** 2 + 1) ** 0.5

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """x̃ -> x_t = x̃ / √(σ²+1), the input the UNet was trained on."""
        sigma = self.sigmas[index_of(t, self.timesteps)]
        return x / (sigma**2 + 1) ** 0.5

    def predict_x0(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None):
        """x̃ at σ -> x̃ at the next σ; call set_timesteps(n) first. The generator is not used."""
        i = index_of(t, self.timesteps)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()  # diffusers steps in float32 and casts back to the model's dtype
        x0 = self.predict_x0(model_output, x, sigma)
        derivative = (x - x0) / sigma  # dx̃/dσ, which is ε̂
        return (x + derivative * (sigma_next - sigma)).to(model_output.dtype)


class EulerAncestralSampler(EulerSampler):
    """Euler down to σ_down, then fresh noise up to σ' (k-diffusion's sample_euler_ancestral, eta = 1).

    Equals diffusers' EulerAncestralDiscreteScheduler.from_config(SD's scheduler config). Noise is drawn at every
    step, the last one included (where σ_up = 0), so a seeded generator stays in step with diffusers.
    """

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None):
        i = index_of(t, self.timesteps)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        x0 = self.predict_x0(model_output, x, sigma)
        # σ_up² is the variance DDPM's posterior would add, in σ units; σ_down² + σ_up² = σ'²
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        x = x + noise_like(model_output, generator) * sigma_up
        return x.to(model_output.dtype)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++ 2M (Lu et al. 2022): second-order multistep in λ, reusing the previous step's x̂_0.

    Equals diffusers' DPMSolverMultistepScheduler.from_config(SD's scheduler config): algorithm "dpmsolver++",
    solver_order 2, solver_type "midpoint", "linspace" spacing, final σ 0 (hence a first-order last step, at
    every step count), no thresholding. Works on x_t, so init_noise_sigma = 1 and scale_model_input is the identity.
    """

    def __init__(self, prediction_type: str = "epsilon", spacing: str = "linspace"):
        super().__init__(prediction_type, spacing)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def set_timesteps(self, num_steps: int) -> None:
        check_num_steps(num_steps)
        if self.spacing == "linspace":  # n + 1 points from 999 down to 0, rounded (half to even, as numpy); the 0 dropped
            self.timesteps = linspace_timesteps(num_steps + 1).round().flip(0)[:-1].long()  # (n,) int64
        else:  # "leading": k · (1000 // (n + 1)) + 1 for k = n..1
            ratio = NUM_TRAIN_TIMESTEPS // (num_steps + 1)
            self.timesteps = torch.arange(num_steps, 0, -1, dtype=torch.int64) * ratio + STEPS_OFFSET
        # (n + 1,) float32; "leading" at n = 999 reaches t = 1000, read as the last level (numpy.interp clamps)
        self.sigmas = torch.cat([self.train_sigmas[self.timesteps.clamp(max=NUM_TRAIN_TIMESTEPS - 1)], torch.zeros(1)])
        self.prev_x0 = None  # the multistep memory: x̂_0 of the previous step

    def alpha_sigma_lambda(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α = √ᾱ, s = √(1−ᾱ) and λ = log α − log s at step i, derived from σ as diffusers derives them."""
        sigma = self.sigmas[i]
        alpha = 1 / (sigma**2 + 1) ** 0.5
        s = sigma * alpha
        return alpha, s, torch.log(alpha) - torch.log(s)  # at σ = 0: s = 0 and λ = +∞

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None):
        """x_t -> x at the next timestep (σ = 0 after the last); the generator is not used."""
        i = index_of(t, self.timesteps)
        alpha, s, lam = self.alpha_sigma_lambda(i)
        alpha_next, s_next, lam_next = self.alpha_sigma_lambda(i + 1)
        if self.prediction_type == "epsilon":
            x0 = (x - s * model_output) / alpha
        else:
            x0 = alpha * x - s * model_output
        x = x.float()  # as in diffusers: x̂_0 from x in its own dtype, the update in float32
        h = lam_next - lam
        first_order = self.prev_x0 is None or i == len(self.timesteps) - 1
        if first_order:
            x_next = (s_next / s) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0
        else:
            _, _, lam_prev = self.alpha_sigma_lambda(i - 1)
            r = (lam - lam_prev) / h
            d = (1.0 / r) * (x0 - self.prev_x0)  # ≈ h · dx̂_0/dλ
            x_next = ((s_next / s) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0
                      - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * d)
        self.prev_x0 = x0
        return x_next.to(model_output.dtype)
