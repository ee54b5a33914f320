"""SD 1.5's noise schedule, the training forward process, and sampling with classifier-free guidance.

The UNet predicts the noise (epsilon) added to the latents. Training draws a timestep t in [0, 1000)
and noise, and asks the UNet to recover the noise from `add_noise(x0, noise, t)`.

Sampling runs one of three samplers, each as diffusers runs it configured from SD 1.5's scheduler_config.json:
- "pndm" (default): PNDM's pseudo linear multistep (Liu et al. 2022). It is SD 1.5's own scheduler, so it made
  the paper's images (StableDiffusionPipeline's defaults: 50 steps, which are 51 UNet calls, guidance 7.5).
- "ddim": DDIM (Song et al. 2021), deterministic unless eta > 0.
- "dpmpp2m": DPM-Solver++(2M) (Lu et al. 2022), similar images in about 20 steps.
PNDM and DDIM visit "leading" timesteps with offset 1 (50 steps: 981, 961, ..., 1) and take alpha_bar[0] as
the "previous" alpha after the last one (set_alpha_to_one=False). DPM-Solver++ visits "linspace" timesteps
(20 steps: 999, 949, ..., 50: SD 1.5's config names no spacing, so that scheduler's default applies) and ends
at sigma = 0.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from model.weights import atomic_write

NUM_TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1  # SD 1.5's scheduler_config `steps_offset`
SCHEDULERS = ("pndm", "ddim", "dpmpp2m")
GUIDANCE = 7.5  # StableDiffusionPipeline's default, with which the paper's images were made
MAX_GUIDANCE = 100.0  # the most the commands take: far beyond any useful scale (1e30 overflows to black images)
MAX_STEPS = NUM_TRAIN_TIMESTEPS - 1  # 1000 "leading" steps with the offset would visit timestep 1000, past the end

Eps = Callable[[torch.Tensor, int], torch.Tensor]  # the guided noise prediction eps(x, t) that a sampler steps with


def sd_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                      num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), with SD's "scaled linear" betas, in float64 (as LDM computes them)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS_CUMPROD = sd_alphas_cumprod()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, per sample.

    `t` holds one integer timestep per batch element.
    """
    alpha_bar = ALPHAS_CUMPROD[t.cpu()].view(-1, *[1] * (x0.ndim - 1))  # float64 on the CPU: not every device has it
    signal, sigma = (c.to(x0.device, x0.dtype) for c in (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()))
    return signal * x0 + sigma * noise


def check_sampler(scheduler: str, steps: int) -> None:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")


def ddim_timesteps(steps: int) -> list[int]:
    """The timesteps DDIM and PNDM step from, highest first: "leading" spacing plus the offset
    (50 steps: 981, 961, ..., 1)."""
    check_sampler("ddim", steps)
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return [i * ratio + STEPS_OFFSET for i in reversed(range(steps))]


def dpm_timesteps(steps: int) -> list[int]:
    """DPM-Solver's "linspace" timesteps, highest first: i * 999 / steps rounded (half to even, as numpy) for
    i = steps, ..., 1 (20 steps: 999, 949, ..., 50)."""
    check_sampler("dpmpp2m", steps)
    return [round(i * ((NUM_TRAIN_TIMESTEPS - 1) / steps)) for i in range(steps, 0, -1)]


def timesteps(scheduler: str, steps: int) -> list[int]:
    """The timesteps of the sampler's UNet calls, in call order, one per call (diffusers' `scheduler.timesteps`).

    PNDM calls the UNet twice at its second timestep (the warm-up step, see `pndm`): 50 steps are 51 calls.
    """
    check_sampler(scheduler, steps)
    if scheduler == "dpmpp2m":
        return dpm_timesteps(steps)
    ts = ddim_timesteps(steps)
    return ts[:2] + ts[1:] if scheduler == "pndm" else ts


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, steps: int, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update from timestep t to t - 1000 // steps (Song et al. 2021, eq. 12):

        x_prev = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,
        x0_pred = (x - sqrt(1 - a_t) * eps) / sqrt(a_t),
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)     (eq. 16)

    with a = alpha_bar; past the first timestep a_prev is alpha_bar[0] (SD's set_alpha_to_one=False).
    eta = 0 is deterministic DDIM; eta > 0 draws z from `generator` (on its own device).
    """
    prev = t - NUM_TRAIN_TIMESTEPS // steps
    a_t = ALPHAS_CUMPROD[t].item()
    a_prev = ALPHAS_CUMPROD[max(prev, 0)].item()
    x0_pred = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev ** 0.5 * x0_pred + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x_prev = x_prev + sigma * z
    return x_prev


def ddim(eps: Eps, x: torch.Tensor, steps: int, eta: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): one `ddim_step` (eq. 12) with the UNet's eps at each of `ddim_timesteps`."""
    for t in ddim_timesteps(steps):
        x = ddim_step(x, eps(x, t), t, steps, eta, generator)
    return x


# Adams-Bashforth weights of the last 1-4 eps, newest first, over a common denominator (PLMS and its warm-up)
ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def pndm(eps: Eps, x: torch.Tensor, steps: int) -> torch.Tensor:
    """PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") in its pseudo linear
    multistep form, PLMS, as SD 1.5's scheduler runs it (diffusers' PNDMScheduler with skip_prk_steps=True).

    Each step is PNDM's transfer part phi(x_t, e', t, t - delta) (eq. 9), which equals DDIM's deterministic
    step (`ddim_step`, eta = 0), taken with e' a linear multistep combination of the eps e_i of the steps so far
    (the fourth-order Adams-Bashforth method, newest e_i first):

        e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24

    Warm-up, in place of the paper's Runge-Kutta steps: the first step is a pseudo improved Euler (Heun) step,
    x' = phi(x_T, e_0), e_1 = eps(x', T - delta), x_{T - delta} = phi(x_T, (e_0 + e_1) / 2); e_1 is not kept.
    The next two steps use the lower orders (3 e_i - e_{i-1}) / 2 and (23 e_i - 16 e_{i-1} + 5 e_{i-2}) / 12.
    So `steps` >= 2 cost steps + 1 UNet calls. The eps history lives in this call only.
    """
    ts = ddim_timesteps(steps)
    history = []  # e_i of the steps taken, oldest first
    for i, t in enumerate(ts):
        e = eps(x, t)
        if i == 0 and steps > 1:
            e_euler = eps(ddim_step(x, e, t, steps), ts[1])
            history.append(e)
            x = ddim_step(x, (e + e_euler) / 2, t, steps)
            continue
        history = history[-3:] + [e]
        weights, denominator = ADAMS_BASHFORTH[len(history)]
        x = ddim_step(x, sum(w * h for w, h in zip(weights, reversed(history))) / denominator, t, steps)
    return x


def dpm_solver_pp_2m(eps: Eps, x: torch.Tensor, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): the second-order multistep solver of the diffusion ODE in data prediction, as diffusers'
    DPMSolverMultistepScheduler runs it (algorithm_type="dpmsolver++", solver_order=2) at `dpm_timesteps`.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t), the data
    prediction x0_i = (x_{t_i} - sigma_{t_i} eps(x_{t_i}, t_i)) / alpha_{t_i}, h_i = lambda_{t_{i+1}} - lambda_{t_i}:

        x_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) x_{t_i} - alpha_{t_{i+1}} (exp(-h_i) - 1) D_i
        D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1},   r_i = h_{i-1} / h_i

    The first step has no x0_{i-1} and takes D_0 = x0_0 (first order, which is DDIM). The last step goes to
    sigma = 0, where the first-order step gives x = x0 of the last timestep (diffusers' final_sigmas_type="zero").
    """
    ts = dpm_timesteps(steps)
    alpha_bar = ALPHAS_CUMPROD[ts].tolist()
    alpha, sigma = [a ** 0.5 for a in alpha_bar], [(1 - a) ** 0.5 for a in alpha_bar]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x0_prev = h_prev = None
    for i, t in enumerate(ts):
        x0 = (x - sigma[i] * eps(x, t)) / alpha[i]
        if i == len(ts) - 1:
            return x0
        h = lam[i + 1] - lam[i]
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h


def guided_eps(unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: int,
               context: torch.Tensor, uncond_context: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + guidance * (eps_c - eps_u).

    One UNet call on a doubled batch: the first half sees the unconditional (empty-prompt) context,
    the second half the prompts' context.
    """
    b = x.shape[0]
    contexts = torch.cat([uncond_context.expand(b, *uncond_context.shape[1:]), context])
    timesteps = torch.full((2 * b,), t, dtype=torch.long, device=x.device)
    eps_uncond, eps_cond = unet(torch.cat([x, x]), timesteps, contexts).chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def sample(unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
           context: torch.Tensor, uncond_context: torch.Tensor, steps: int = 50, guidance: float = GUIDANCE,
           eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = False,
           scheduler: str = "pndm") -> torch.Tensor:
    """Denoise `latents` (initial Gaussian noise, (B, 4, h, w)) into scaled image latents with `scheduler`
    ("pndm", "ddim" or "dpmpp2m") over `steps` steps, with classifier-free guidance.

    `unet(latents, timesteps, context) -> eps`, with timesteps a (batch,) long tensor; `context` is the
    prompts' text-encoder output (B, 77, d), `uncond_context` the empty prompt's, (1, 77, d) or (B, 77, d).
    `eta` and `generator` are DDIM's (eta > 0 only there).
    """
    check_sampler(scheduler, steps)
    if eta and scheduler != "ddim":
        raise ValueError(f"eta applies to DDIM only; scheduler {scheduler!r} is deterministic (got eta {eta})")
    if context.shape[0] != latents.shape[0]:
        raise ValueError(f"context has batch {context.shape[0]}, latents have batch {latents.shape[0]}")
    bar = tqdm(total=len(timesteps(scheduler, steps)), desc=scheduler, unit="call", disable=not progress)

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        bar.update()
        return guided_eps(unet, x, t, context, uncond_context, guidance)

    with bar:
        if scheduler == "ddim":
            return ddim(eps, latents, steps, eta, generator)
        return pndm(eps, latents, steps) if scheduler == "pndm" else dpm_solver_pp_2m(eps, latents, steps)


# ---------------------------------------------------------------- provenance

SETTINGS = "sampling.json"  # beside generated images: the sampler and settings that made them (FID depends on them)


def write_settings(folder: Path, scheduler: str, steps: int, guidance: float, eta: float, seed: int, size: int) -> None:
    """folder/sampling.json: the sampler and settings that made the images in `folder`."""
    settings = dict(scheduler=scheduler, steps=steps, guidance=guidance, eta=eta, seed=seed, size=size)
    with atomic_write(folder / SETTINGS, "w") as f:
        json.dump(settings, f, indent=1)


def read_settings(folder: Path) -> dict | None:
    """The settings in folder/sampling.json, or None where the images' sampler is not recorded."""
    path = folder / SETTINGS
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(settings, dict) or not {"scheduler", "steps", "guidance"} <= settings.keys():
        raise ValueError(f"{path}: expected a JSON object with 'scheduler', 'steps' and 'guidance' (as sample.py "
                         f"writes it), got {settings!r}")
    return settings


def describe(settings: dict | None) -> str:
    """How images were made, for reports: e.g. "pndm, 50 steps, guidance 7.5" (the paper's)."""
    if settings is None:
        return "an unrecorded sampler (no sampling.json)"
    return f"{settings['scheduler']}, {settings['steps']} steps, guidance {settings['guidance']:g}"
