"""The A1111 names in minidb/pipeline.py SAMPLER_NAMES are claims about minidb's samplers; check them."""

import torch

from minidb.pipeline import SAMPLER_NAMES, SAMPLERS, a1111_names
from minidb.schedulers import DDIMSampler, DDPMSampler


def test_every_sampler_has_a_name():
    assert SAMPLER_NAMES.keys() == SAMPLERS.keys()


def test_ddpm_is_ddim_with_eta_1_but_for_the_last_jump():
    """Why DDPM is recorded as "Sampler: DDIM, Eta DDIM: 1"."""
    ddpm, ddim = DDPMSampler(), DDIMSampler(eta=1.0)
    ddpm.set_timesteps(7)
    ddim.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in ddpm.timesteps:
        a = ddpm.step(eps, t, x, torch.Generator().manual_seed(int(t)))
        b = ddim.step(eps, t, x, torch.Generator().manual_seed(int(t)))
        if t > 1:
            torch.testing.assert_close(a, b)
        else:  # to ᾱ = 1 in DDPM, to ᾱ_0 = 0.99915 in DDIM
            assert 0.01 < (a - b).abs().max() < 0.5


def test_timesteps_are_a1111s_schedules():
    for n in (7, 20, 30):
        euler, dpm, ddim = SAMPLERS["euler"](), SAMPLERS["dpmpp-2m"](), SAMPLERS["ddim"]()
        for sampler in (euler, dpm, ddim):
            sampler.set_timesteps(n)
        # "Uniform": k-diffusion's get_sigmas(n), at t = linspace(999, 0, n)
        torch.testing.assert_close(euler.timesteps.double(), torch.linspace(999, 0, n, dtype=torch.float64))
        # "SGM Uniform": t = linspace(999, 0, n + 1) without its last point (here rounded to integers)
        assert torch.equal(dpm.timesteps, torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1].round().long())
        # A1111's DDIM: range(0, 1000, 1000 // n) + 1, one timestep more when n does not divide 1000
        a1111 = torch.arange(0, 1000, 1000 // n).add(1).clip(max=999).flip(0)
        assert torch.equal(ddim.timesteps, a1111 if 1000 % n == 0 else a1111[1:])
        assert len(a1111) == n + (n in (7, 30))


def test_sdxls_leading_timesteps_are_a1111s_ddim_schedule_type():
    """SDXL's samplers space their timesteps "leading", which its PNGs recorded as A1111's "Uniform" (999 down
    to 0): A1111 would redraw them on another schedule. Euler's are A1111's "DDIM" schedule type."""
    assert [a1111_names(s, "SDXL")[1] for s in SAMPLERS] == ["Automatic", "Automatic", "DDIM", "DDIM", "DDIM"]
    assert [a1111_names(s, "SD 1.x") for s in SAMPLERS] == [SAMPLER_NAMES[s] for s in SAMPLERS]
    for n in (7, 20, 30):
        euler = SAMPLERS["euler"](spacing="leading")
        euler.set_timesteps(n)
        a1111 = torch.arange(1, 1000, 1000 // n).flip(0)  # sd_schedulers.py ddim_scheduler's timesteps
        assert torch.equal(euler.timesteps.long(), a1111 if 1000 % n == 0 else a1111[1:])
