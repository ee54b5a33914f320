"""The noise schedule and the three samplers (PNDM, DDIM, DPM-Solver++(2M)) against diffusers' schedulers
configured from SD 1.5's scheduler_config.json; guidance by hand."""
import math

import pytest
import torch

from model.sampling import ALPHAS_CUMPROD, MAX_STEPS, SCHEDULERS, add_noise, ddim_step, ddim_timesteps, guided_eps, \
    sample, timesteps
from sd_pipeline import sd15_scheduler

# diffusers keeps the schedule in float32, we in float64 (as LDM): the two differ by float32 rounding.
TOL = 2e-5


def sd15_ddim():
    sched = sd15_scheduler("ddim")
    assert sched.config.timestep_spacing == "leading"
    return sched


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def toy_unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A stand-in noise predictor that depends on all three inputs, per batch element."""
    return torch.tanh(0.7 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000)


def test_alphas_cumprod_match_diffusers_and_ldm_formula():
    sched = sd15_ddim()
    assert ALPHAS_CUMPROD.dtype == torch.float64 and ALPHAS_CUMPROD.shape == (1000,)
    assert rel_err(ALPHAS_CUMPROD, sched.alphas_cumprod.double()) < 1e-6
    assert (ALPHAS_CUMPROD.float() / sched.alphas_cumprod - 1).abs().max() < 1e-5  # also the small end
    b0 = 0.00085
    b1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    assert ALPHAS_CUMPROD[0].item() == pytest.approx(1 - b0, rel=1e-15)
    assert ALPHAS_CUMPROD[1].item() == pytest.approx((1 - b0) * (1 - b1), rel=1e-15)
    # Lin et al. 2024 ("Common diffusion noise schedules are flawed") give SD's sqrt(alpha_bar_T) as 0.068265
    assert ALPHAS_CUMPROD[-1].sqrt().item() == pytest.approx(0.068265, abs=1e-6)


def test_add_noise_matches_diffusers():
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = add_noise(x0, noise, t)
    assert ours.dtype == torch.float32
    assert rel_err(ours, sd15_ddim().add_noise(x0, noise, t)) < TOL
    assert rel_err(add_noise(x0.double(), noise.double(), t)[2], ALPHAS_CUMPROD[250].sqrt() * x0[2].double()
                   + (1 - ALPHAS_CUMPROD[250]).sqrt() * noise[2].double()) < 1e-12


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [20, 25, 50])
def test_timesteps_match_diffusers(scheduler, steps):
    sched = sd15_scheduler(scheduler)
    sched.set_timesteps(steps)
    assert timesteps(scheduler, steps) == sched.timesteps.tolist()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_timesteps_match_diffusers_at_every_step_count(scheduler):
    sched = sd15_scheduler(scheduler)
    for steps in range(1, MAX_STEPS + 1):
        sched.set_timesteps(steps)
        assert timesteps(scheduler, steps) == sched.timesteps.tolist(), steps


def test_sd15_timesteps_and_step_bounds():
    assert ddim_timesteps(50) == timesteps("ddim", 50) == list(range(981, 0, -20))
    assert timesteps("pndm", 50) == [981, 961] + list(range(961, 0, -20))  # 51 UNet calls
    assert timesteps("dpmpp2m", 20) == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300,
                                        250, 200, 150, 100, 50]
    # 1000 steps would visit timestep 1000, one past the schedule's end: diffusers' DDIM does, then fails there
    sched = sd15_ddim()
    sched.set_timesteps(1000)
    assert sched.timesteps.max() == len(ALPHAS_CUMPROD)
    for bad in (0, 1000):
        for scheduler in SCHEDULERS:
            with pytest.raises(ValueError, match="steps must be between 1 and 999"):
                timesteps(scheduler, bad)
    with pytest.raises(ValueError, match="scheduler must be one of pndm, ddim, dpmpp2m, got 'euler'"):
        timesteps("euler", 50)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [10, 50])
def test_each_ddim_step_matches_diffusers(steps, eta):
    sched = sd15_ddim()
    sched.set_timesteps(steps)
    worst = 0.0
    for t in ddim_timesteps(steps):
        x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        ours = ddim_step(x, eps, t, steps, eta, torch.Generator().manual_seed(t))
        ref = sched.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        worst = max(worst, rel_err(ours, ref))
    print(f"steps {steps} eta {eta}: worst per-step relative error {worst:.2e}")
    assert worst < TOL


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_loop_matches_diffusers_pipeline_loop(eta):
    """Our `sample` against the loop StableDiffusionPipeline runs, with diffusers' scheduler."""
    steps, guidance = 20, 7.5
    latents, context, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    ours = sample(toy_unet, latents, context, uncond, steps, guidance, eta, torch.Generator().manual_seed(1),
                  scheduler="ddim")
    sched, gen, x = sd15_ddim(), torch.Generator().manual_seed(1), latents
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps_u, eps_c = toy_unet(torch.cat([x, x]), t.expand(4), torch.cat([uncond.expand(2, -1, -1), context])).chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=eta, generator=gen).prev_sample
    print(f"eta {eta}: relative error after {steps} guided steps {rel_err(ours, x):.2e}")
    assert rel_err(ours, x) < TOL


def test_guidance_by_hand():
    """One step (t = 1 -> alpha_bar[0]) with a linear stand-in UNet, worked out with the formulas written here."""
    calls = []

    def unet(x, t, context):
        calls.append((x.clone(), t.clone(), context.clone()))
        return 0.5 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    latents, context = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 77, 16, dtype=torch.float64)
    uncond = torch.randn(1, 77, 16, dtype=torch.float64)
    out = sample(unet, latents, context, uncond, steps=1, guidance=7.5, scheduler="ddim")

    (x_in, t_in, ctx_in), = calls  # one call, both halves in one batch, unconditional first
    assert torch.equal(x_in, torch.cat([latents, latents])) and t_in.tolist() == [1] * 6
    assert torch.equal(ctx_in, torch.cat([uncond.expand(3, -1, -1), context]))

    eps_u = 0.5 * latents + uncond.mean()
    eps_c = 0.5 * latents + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    eps = eps_u + 7.5 * (eps_c - eps_u)
    b0 = 0.00085
    b1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    a_t, a_prev = (1 - b0) * (1 - b1), 1 - b0
    x0 = (latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_uncond_context_per_sample_and_batch_check():
    x, context, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    one = guided_eps(toy_unet, x, 981, context, uncond, 7.5)
    torch.testing.assert_close(guided_eps(toy_unet, x, 981, context, uncond.expand(2, -1, -1), 7.5), one)
    with pytest.raises(ValueError, match="batch"):
        sample(toy_unet, x, context[:1], uncond, steps=2)


def test_eta_noise_is_reproducible_and_used():
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = ddim_step(x, eps, 501, 50, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, ddim_step(x, eps, 501, 50, 1.0, torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, ddim_step(x, eps, 501, 50, 1.0, torch.Generator().manual_seed(6)))
    assert torch.equal(ddim_step(x, eps, 501, 50), ddim_step(x, eps, 501, 50, 0.0, torch.Generator().manual_seed(6)))


def linear_unet(seed: int = 0, calls: list | None = None):
    """A deterministic stand-in UNet in float64: a seeded linear map of the latents (mixing channels) and of t,
    plus each sample's context mean (so guidance matters). Each call's (latents, timesteps) go to `calls`."""
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.randn(4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64).view(1, 4, 1, 1)

    def unet(x, t, context):
        if calls is not None:
            calls.append((x.clone(), t.tolist()))
        return (torch.einsum("oc,bchw->bohw", W, x) + b * t.view(-1, 1, 1, 1) / 1000
                + context.mean(dim=(1, 2)).view(-1, 1, 1, 1))
    return unet


def float64_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 77, 16, generator=g, dtype=torch.float64),
            torch.randn(1, 77, 16, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [20, 25, 50])
def test_trajectory_matches_diffusers(scheduler, steps):
    """The whole trajectory in float64: every latent the UNet sees (PNDM's warm-up latent included), and the
    result, against the loop StableDiffusionPipeline runs with diffusers' scheduler."""
    latents, context, uncond = float64_inputs()
    ours, theirs = [], []
    out = sample(linear_unet(calls=ours), latents, context, uncond, steps, 7.5, scheduler=scheduler)
    unet, sched, x = linear_unet(calls=theirs), sd15_scheduler(scheduler), latents
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t.expand(4), torch.cat([uncond.expand(2, -1, -1), context])).chunk(2)
        x = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, x).prev_sample
    assert [t for _, t in ours] == [t for _, t in theirs] == [[t] * 4 for t in timesteps(scheduler, steps)]
    errors = [rel_err(a, b) for (a, _), (b, _) in zip(ours, theirs)] + [rel_err(out, x)]
    print(f"{scheduler} {steps} steps: worst relative error over {len(errors)} latents {max(errors):.2e}")
    assert out.dtype == x.dtype == torch.float64 and max(errors) < 1e-5


@pytest.mark.parametrize("scheduler, steps, calls", [("pndm", 50, 51), ("pndm", 2, 3), ("pndm", 1, 1),
                                                     ("ddim", 50, 50), ("dpmpp2m", 20, 20), ("dpmpp2m", 1, 1)])
def test_unet_calls(scheduler, steps, calls):
    """What a sampler costs: one UNet call (on the doubled guidance batch) per entry of `timesteps`."""
    seen = []
    sample(linear_unet(calls=seen), *float64_inputs(), steps=steps, scheduler=scheduler)
    assert len(seen) == len(timesteps(scheduler, steps)) == calls
    assert all(x.shape[0] == 4 for x, _ in seen)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_no_state_between_calls_or_across_the_batch(scheduler):
    """PNDM's eps history and DPM-Solver's last x0 live in one call: a second call, or each row alone, gives the
    same latents as the batch."""
    latents, context, uncond = float64_inputs()
    unet = linear_unet()
    first = sample(unet, latents, context, uncond, steps=10, scheduler=scheduler)
    sample(unet, latents.flip(0), context, uncond, steps=10, scheduler=scheduler)
    assert torch.equal(sample(unet, latents, context, uncond, steps=10, scheduler=scheduler), first)
    for i in range(2):
        alone = sample(unet, latents[i:i + 1], context[i:i + 1], uncond, steps=10, scheduler=scheduler)
        torch.testing.assert_close(alone, first[i:i + 1], rtol=1e-12, atol=1e-12)


def test_eta_only_with_ddim():
    for scheduler in ("pndm", "dpmpp2m"):
        with pytest.raises(ValueError, match="eta applies to DDIM only"):
            sample(toy_unet, *float64_inputs(), steps=5, eta=0.5, scheduler=scheduler)
