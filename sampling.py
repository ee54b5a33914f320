"""SD 1.5's noise schedule, the training forward process, and DDIM sampling with classifier-free guidance.

The UNet predicts the noise (epsilon) added to the latents. Training draws a timestep t in [0, 1000)
and noise, and asks the UNet to recover the noise from `add_noise(x0, noise, t)`. Sampling runs DDIM
(Song et al. 2021) over 50 of the 1000 timesteps, as SD 1.5's scheduler config does: "leading" spacing
with offset 1, i.e. 981, 961, ..., 1, and alpha_bar[0] as the "previous" alpha after the last step.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

NUM_TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1  # SD 1.5's scheduler_config `steps_offset`


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


def ddim_timesteps(steps: int) -> list[int]:
    """The timesteps DDIM visits, highest first: "leading" spacing plus the offset (50 steps: 981, 961, ..., 1)."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return [i * ratio + STEPS_OFFSET for i in reversed(range(steps))]


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
           context: torch.Tensor, uncond_context: torch.Tensor, steps: int = 50, guidance: float = 7.5,
           eta: float = 0.0, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Denoise `latents` (initial Gaussian noise, (B, 4, h, w)) into scaled image latents by guided DDIM.

    `unet(latents, timesteps, context) -> eps`, with timesteps a (batch,) long tensor; `context` is the
    prompts' text-encoder output (B, 77, d), `uncond_context` the empty prompt's, (1, 77, d) or (B, 77, d).
    """
    if context.shape[0] != latents.shape[0]:
        raise ValueError(f"context has batch {context.shape[0]}, latents have batch {latents.shape[0]}")
    x = latents
    for t in tqdm(ddim_timesteps(steps), desc="DDIM", disable=not progress):
        x = ddim_step(x, guided_eps(unet, x, t, context, uncond_context, guidance), t, steps, eta, generator)
    return x
