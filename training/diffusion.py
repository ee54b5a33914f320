"""The diffusion objective of the fine-tuning run (the SeLoRA paper's section 3.5, as in latent diffusion): each
image's VAE posterior, cached; a noisy latent at a random timestep; the MSE between the UNet's predicted and the
true noise; and one training step around it, inside the method's controller (adapters.Controller).

The latents are cached once per image (`cached_latents`) and sampled afresh from the posterior every step,
which is exact since the crop is deterministic. Every random draw of a batch (latent sample, noise, t) comes from
one generator on the CPU, so a seed gives the same batches on every device and in every process.

With train.py --compile the step runs a compiled view of the model (fast/torch_compile.py), except where the method's
capture needs the uncompiled modules (SeLoRA's first fast test step, adapters.Controller.needs_uncompiled).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from data import datasets
from fast import distributed
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise
from model.sd15 import SD15
from model.weights import load_file, save_file
from vae import posterior_to_latents


def latent_key(path: str | os.PathLike, size: int, model_key: str) -> str:
    """Cache key of one image's latents: the file (path, byte size, modification time), the crop size, the VAE."""
    stat = Path(path).stat()
    ident = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{size}|{model_key}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def cached_latents(examples: list[datasets.Example], size: int, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   cache_dir: str | os.PathLike, model_key: str, batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (mean, logvar)} of the VAE posterior of each example's preprocessed image, encoded once.

    Exact, since the crop is deterministic: training samples mean + exp(logvar / 2) * noise each step, as it
    would from a fresh encoding. `encode` maps images [B, 3, size, size] in [-1, 1] to (mean, logvar);
    `model_key` names the VAE (e.g. its weights file and dtype) so that another VAE never reads these files.
    """
    cache_dir = Path(cache_dir)
    out, todo = {}, []
    for e in examples:
        file = cache_dir / f"{latent_key(e.path, size, model_key)}.safetensors"
        if file.is_file():
            t = load_file(file)
            out[e.name] = (t["mean"].clone(), t["logvar"].clone())
        else:
            todo.append((e, file))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        with torch.no_grad():
            mean, logvar = encode(torch.stack([datasets.load_image(e.path, size) for e, _ in chunk]))
        for j, (e, file) in enumerate(chunk):
            m, lv = mean[j].detach().float().cpu().contiguous(), logvar[j].detach().float().cpu().contiguous()
            save_file({"mean": m, "logvar": lv}, file, {"name": e.name, "size": str(size), "model": model_key})
            out[e.name] = (m, lv)
    return out


class Examples:
    """One split part ready for training: cached VAE posteriors (mean, logvar) at `size` px and token ids."""

    def __init__(self, sd: SD15, examples: list[datasets.Example], size: int, cache: Path):
        self.names = [e.name for e in examples]
        self.captions = [e.caption for e in examples]
        self.ids, self.truncated = sd.tokenizer.encode(self.captions) if examples else (torch.zeros(0, 77, dtype=torch.long), 0)
        self.empty = sd.tokenizer.encode([""])[0][0]  # the empty caption's ids, what a dropped caption becomes
        if not examples:
            return
        vae_dtype = next(sd.vae.parameters()).dtype
        posterior = cached_latents(examples, size, lambda im: sd.vae.encode(im.to(sd.device, vae_dtype)),
                                        cache, model_key=f"{sd.fingerprints['vae']}|{vae_dtype}")
        self.mean = torch.stack([posterior[n][0] for n in self.names])
        self.logvar = torch.stack([posterior[n][1] for n in self.names])

    def __len__(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------- the step

def noisy_batch(ex: Examples, index: torch.Tensor, gen: torch.Generator, caption_dropout: float = 0.0):
    """(noisy latents, t, true noise, token ids) for the examples at `index`, drawn from `gen` on the CPU, so a
    seed gives the same batch on every device. With `caption_dropout` p > 0, each caption is replaced by the
    empty one with probability p (as SD 1.5 was trained, 10%), so that the model's unconditional prediction, the
    one classifier-free guidance pushes away from, learns the new domain too; at 0, nothing more is drawn."""
    x0 = posterior_to_latents(ex.mean[index], ex.logvar[index], gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(index),), generator=gen)
    ids = ex.ids[index]
    if caption_dropout > 0:
        ids = torch.where((torch.rand(len(index), generator=gen) < caption_dropout)[:, None], ex.empty, ids)
    return add_noise(x0, noise, t), t, noise, ids


def denoising_loss(sd: SD15, batch, autocast) -> torch.Tensor:
    """The MSE between predicted and true noise, averaged over the batch (section 3.5, paper:148)."""
    noisy, t, noise, ids = (x.to(sd.device) for x in batch)
    with autocast:
        pred = sd.unet(noisy, t, sd.text_encoder(ids))
    return F.mse_loss(pred.float(), noise)


def train_step(sd: SD15, batch, step: int, controller, optimizer, params: list[torch.nn.Parameter], autocast,
               compiled_sd: SD15 | None = None) -> float:
    """Forward and backward of this process's rows of the global batch (all of it in a single process),
    inside the method's capture; returns the global batch's mean loss, with every adapter's gradient that
    of the global batch (distributed.average_gradients). With `compiled_sd` (fast.torch_compile.compiled(sd)) the step runs
    compiled, except a step whose capture needs the uncompiled modules (Controller.needs_uncompiled)."""
    if compiled_sd is not None and not controller.needs_uncompiled(step):
        sd = compiled_sd
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs (--compile-mode reduce-overhead): a new step
    part = distributed.shard(batch)
    loss = None
    with controller.capture(step, len(part[0])):  # SeLoRA's test steps: each tested layer's x and g are kept
        optimizer.zero_grad(set_to_none=True)
        if len(part[0]):  # a process gets no rows when an epoch's last batch is shorter than the process count
            loss = denoising_loss(sd, part, autocast)
            loss.backward()
            controller.add_penalty_gradient()  # AdaLoRA's, LoRA^2's regulariser
    controller.after_backward()  # SeLoRA's test steps: each layer's FI-scores (eq. 3-4), before the weights move
    return distributed.average_gradients(params, loss, len(part[0]), len(batch[0]))


def second_pass(sd: SD15, batch, step: int, controller, params: list[torch.nn.Parameter], autocast) -> None:
    """The same batch forward and backward again, after optimizer.step(), inside the controller's capture: SeLoRA's
    script rule reads its gradients at the new weights (methods/selora_script.py; the script's lines 634-647). Uncompiled
    (one step in t, on the model train.py passes); the gradients are dropped after, as the script's next zero_grad does."""
    part = distributed.shard(batch)
    with controller.capture(step, len(part[0])):
        if len(part[0]):
            denoising_loss(sd, part, autocast).backward()
    controller.after_backward()
    for p in params:
        p.grad = None


@torch.no_grad()
def validation_loss(sd: SD15, ex: Examples, batch: int, seed: int, autocast) -> float:
    """Loss on the validation part with the same t and noise at every epoch (a fixed generator), so epochs
    compare; NaN when the split has no validation part. Global batches, shared by the processes as in training."""
    if not len(ex):
        return math.nan
    gen, total = torch.Generator().manual_seed(seed + 1), 0.0
    for index in torch.arange(len(ex)).split(batch * distributed.world_size()):
        part = distributed.shard(noisy_batch(ex, index, gen))
        if len(part[0]):
            total += denoising_loss(sd, part, autocast).item() * len(part[0])
    return distributed.all_reduce_sum(torch.tensor(total, dtype=torch.float64)).item() / len(ex)
