"""Pretrain the tiny Stable Diffusion that the embedded default, the tour and the mini-study fine-tune: SD 1.5's
architecture at toy size (sd_unet.UNet, clip_text.CLIPTextModel with a BPE tokenizer in CLIP's format, vae.VAE),
trained from scratch on the CPU on the base domain of coloured shapes (data/shapes.py), never on phantoms.

    .venv/bin/python tools/pretrain_tiny.py --out assets/tiny-sd --readers assets/readers

In order, each stage deterministic for --seed (on one machine, with the same thread count):
1. the tokenizer: byte-level BPE merges learned from the captions' words (both domains' vocabularies, as CLIP's
   BPE covers English; the text encoder never sees a phantom caption);
2. the VAE (one down-sampling level): reconstruction of shapes and of generic grey and coloured collages, with
   LDM's small KL weight, then rescaled (exactly) so that its latents times 0.18215 have unit variance, as
   SD 1.5's do;
3. the UNet and the text encoder together: the diffusion loss on the shapes' latents, one caption in ten
   dropped for classifier-free guidance, an EMA of the weights kept (what is saved);
4. the readers (metrics/readback.py) of both domains, the instruments of caption adherence and phantom-FID;
5. the check: images of the held-out captions (shapes.HELD_OUT, never drawn in pretraining) at the model's
   native size, read back by the shapes reader.
It writes a diffusers pipeline folder (sd15.save_sd15, fp16) with pretrain.json (the command, the commit, the
losses, the timings, the check) and docs/tiny-sd.png (loss curves and the check's images).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import phantoms, shapes  # noqa: E402
from metrics import readback  # noqa: E402
from model.clip_tokenizer import END, END_OF_WORD, START, Tokenizer, bytes_to_unicode, merge_pair  # noqa: E402
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise  # noqa: E402
from model.sd15 import SD15, generate, save_sd15  # noqa: E402
from training import plots, sheets  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from sd_unet import UNet, UNetConfig  # noqa: E402
from vae import LATENT_SCALE, VAE, VAEConfig, posterior_to_latents  # noqa: E402

SIZE = 32  # the native image size: 16x16 latents
TEXT = CLIPTextConfig(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_heads=2, context_dim=64,
                  norm_groups=8)  # UNetConfig.tiny()'s shape with the text encoder's width
VAE_SHAPE = VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=8)


# ---------------------------------------------------------------- 1. tokenizer

def corpus() -> Counter:
    """Words of every caption of both domains, counted over all their attribute combinations."""
    words = Counter()
    for module in (shapes, phantoms):
        rng = np.random.default_rng(0)
        for _ in range(2000):
            attrs = module.random_attributes(rng) if module is phantoms else module.random_attributes(rng, rng.random() < 0.2)
            words.update(module.caption(attrs).replace(",", " ,").split())
    return words


def learn_bpe(words: Counter, max_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (Sennrich et al. 2016, as CLIP's): start from each word's byte symbols (the last marked
    end-of-word) and merge the most frequent adjacent pair (ties: the smaller pair) until no pair occurs twice.
    Returns CLIP's vocabulary order: 256 byte symbols, the same with `</w>`, the merges' results, start, end."""
    enc = bytes_to_unicode()
    split = {w: [enc[b] for b in w.encode()] for w in words}
    for symbols in split.values():
        symbols[-1] += END_OF_WORD
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs or max(pairs.values()) < 2:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        split = {w: merge_pair(symbols, best) for w, symbols in split.items()}
    base = list(enc.values())
    symbols = base + [s + END_OF_WORD for s in base] + ["".join(m) for m in merges] + [START, END]
    return {s: i for i, s in enumerate(symbols)}, merges


# ---------------------------------------------------------------- 2. VAE

def ground(rng: np.random.Generator, size: int, colour) -> np.ndarray:
    """A flat, linear-gradient or radial-gradient background between two random colours, (size, size, 3)."""
    c0, c1 = np.array(colour(), dtype=np.float64), np.array(colour(), dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(3)
    if kind == 0:
        t = np.zeros((size, size))
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
    else:
        cx, cy = rng.uniform(0, 1, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.3, 1.0), 0, 1)
    return c0 + (c1 - c0) * t[..., None]


def collage(rng: np.random.Generator, size: int) -> Image.Image:
    """A generic image: on a flat or graded ground, a few filled ellipses and boxes, thin lines, arcs and rings,
    and patches of parallel lines or arcs (gratings of 2-6 px period); maybe blurred and noised. What a VAE of
    natural images has seen plenty of (edges, thin structure, gradients, texture), no phantom among them."""
    grey = rng.random() < 0.5
    def colour():
        return (int(rng.integers(256)),) * 3 if grey else tuple(int(c) for c in rng.integers(0, 256, 3))
    im = Image.fromarray(ground(rng, size, colour).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 9)):
        xs, ys = sorted(rng.uniform(-0.2, 1.2, 2) * size), sorted(rng.uniform(-0.2, 1.2, 2) * size)
        xy = [xs[0], ys[0], xs[1], ys[1]]
        kind, width = rng.integers(6), int(rng.integers(1, 3))
        if kind == 0:
            d.ellipse(xy, fill=colour())
        elif kind == 1:
            d.rectangle(xy, fill=colour())
        elif kind == 2:
            d.line(list(rng.uniform(-0.1, 1.1, 4) * size), fill=colour(), width=width)
        elif kind == 3:
            d.arc(xy, *sorted(rng.uniform(0, 360, 2)), fill=colour(), width=width)
        elif kind == 4:
            d.ellipse(xy, outline=colour(), width=width)
        else:  # a grating: parallel lines, or stacked arcs, 2 to 6 px apart
            period, fill, arcs = rng.uniform(2, 6) * size / 32, colour(), rng.random() < 0.5
            for y in np.arange(ys[0], ys[1], period):
                if arcs:
                    d.arc([xs[0], y - period, xs[1], y + 2 * period], 200, 340, fill=fill, width=1)
                else:
                    d.line([xs[0], y, xs[1], y], fill=fill, width=1)
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    a = np.asarray(im, dtype=np.float64)
    a = a + rng.normal(0, rng.uniform(0, 10), (size, size, 1 if grey else 3))  # grey images keep grey noise
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(steps: int, batch: int, seed: int, log) -> tuple[VAE, list[float]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = VAE(VAE_SHAPE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=max(steps, 1))
    losses = []
    for step in range(steps):
        ims = [collage(rng, SIZE) if rng.random() < 0.75 else shapes.draw(rng, SIZE, shapes.random_attributes(rng))
               for _ in range(batch)]
        x = torch.stack([readback.to_tensor(im) for im in ims])
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        detail = sum(F.l1_loss(a, b) for a, b in zip(edges(recon), edges(x)))  # thin lines and texture
        loss = F.mse_loss(recon, x) + 0.5 * detail + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"vae: step {step}, reconstruction + detail + KL {loss.item():.5f}")
    return vae.eval(), losses


@torch.no_grad()
def rescale_latents(vae: VAE, images: torch.Tensor) -> float:
    """Scale the latent space by c so that the latents' std is 1 / LATENT_SCALE (SD 1.5's convention), exactly:
    quant_conv's mean rows times c, its log-variance rows plus 2 log c, post_quant_conv's inputs divided by c."""
    mean, _ = vae.encode(images)
    c = (1 / LATENT_SCALE) / mean.std().item()
    z = vae.config.latent_channels
    vae.quant_conv.weight[:z] *= c
    vae.quant_conv.bias[:z] *= c
    vae.quant_conv.bias[z:] += 2 * np.log(c)
    vae.post_quant_conv.weight /= c
    return c


def high_pass(images: torch.Tensor) -> torch.Tensor:
    """The grey level minus its 3x3 box mean: the detail (ribs, edges) a round trip must keep."""
    grey = images.mean(dim=1, keepdim=True)
    return grey - F.avg_pool2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@torch.no_grad()
def round_trip(vae: VAE, reader: readback.Reader, n: int = 256, seed: int = 99) -> tuple[dict, torch.Tensor]:
    """Real phantoms through the VAE (encode's mean, decode), as the fine-tuned model can at best draw them:
    - adherence of the originals and of the round trips, read by the phantoms reader;
    - detail: the correlation of the high-passed image with the noiseless drawing's (the same geometry drawn
      with noise 0), for the originals and for the round trips: ribs lost give a low figure;
    - tint: the mean spread between the colour channels, in grey levels (the originals have none).
    Returns the figures and a (2n, 3, H, W) stack, the originals then their round trips, for the figure."""
    rng = np.random.default_rng(seed)
    noisy, clean, prompts = [], [], []
    for _ in range(n):
        attrs, state = phantoms.random_attributes(rng), rng.bit_generator.state
        clean.append(readback.to_tensor(phantoms.draw(rng, SIZE, attrs, noise=0.0)))
        rng.bit_generator.state = state
        noisy.append(readback.to_tensor(phantoms.draw(rng, SIZE, attrs)))
        prompts.append(phantoms.caption(attrs))
    x, clean = torch.stack(noisy), torch.stack(clean)
    y = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    def detail(images):
        return float(torch.corrcoef(torch.stack([high_pass(images).flatten(), high_pass(clean).flatten()]))[0, 1])
    figures = {"images": n, "size": SIZE,
               "adherence": {"originals": readback.adherence(reader, x, prompts)["adherence"],
                             "round_trip": readback.adherence(reader, y, prompts)["adherence"]},
               "detail_correlation": {"originals": detail(x), "round_trip": detail(y)},
               "tint_grey_levels": {"originals": 0.0,
                                    "round_trip": float((y.amax(1) - y.amin(1)).mean() * 127.5)},
               "mse": float(F.mse_loss(y, x))}
    return figures, torch.cat([x[:16], y[:16]])


# ---------------------------------------------------------------- 3. UNet and text encoder

def base_data(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    attrs = [shapes.random_attributes(rng) for _ in range(n)]
    images = torch.stack([readback.to_tensor(shapes.draw(rng, SIZE, a)) for a in attrs])
    return images, [shapes.caption(a) for a in attrs]


def train_diffusion(sd: SD15, mean: torch.Tensor, logvar: torch.Tensor, ids: torch.Tensor, steps: int, batch: int,
                    seed: int, log, lr: float = 1e-3) -> tuple[list[float], UNet, CLIPTextModel]:
    """The diffusion loss (predicted against true noise at a uniform t) on the UNet and the text encoder;
    returns the losses and EMA copies (decay 0.999) of both, what is saved."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    empty = sd.tokenizer.encode([""])[0]
    params = list(sd.unet.parameters()) + list(sd.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = min(200, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / max(steps, 1)))))
    ema_unet, ema_text = copy.deepcopy(sd.unet), copy.deepcopy(sd.text_encoder)
    sd.unet.train(), sd.text_encoder.train()
    losses = []
    for step in range(steps):
        index = torch.randint(0, len(mean), (batch,), generator=gen)
        x0 = posterior_to_latents(mean[index], logvar[index], gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < 0.1
        batch_ids = torch.where(drop[:, None], empty, ids[index])
        pred = sd.unet(add_noise(x0, noise, t), t, sd.text_encoder(batch_ids))
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = 0.999 if step >= warmup else 0.0
        with torch.no_grad():
            for ema, live in ((ema_unet, sd.unet), (ema_text, sd.text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"unet + text encoder: step {step}, loss {np.mean(losses[-200:]):.4f}")
    return losses, ema_unet.eval(), ema_text.eval()


# ---------------------------------------------------------------- 5. the check

def held_out_prompts(per_combination: int) -> list[str]:
    combos = [c for i, c in enumerate(itertools.product(*shapes.ATTRIBUTES.values())) if i in shapes.HELD_OUT]
    return [shapes.caption(dict(zip(shapes.ATTRIBUTES, c))) for c in combos for _ in range(per_combination)]


def check(sd: SD15, reader: readback.Reader, per_combination: int, seed: int) -> tuple[dict, torch.Tensor, list[str]]:
    """Adherence of the model's images of the held-out captions, and of freshly drawn images of the same
    captions (the reader's own accuracy, the ceiling)."""
    prompts = held_out_prompts(per_combination)
    images = generate(sd, prompts, seed=seed, size=SIZE, batch=32, progress=False)
    rng = np.random.default_rng(seed + 1)
    drawn = torch.stack([readback.to_tensor(shapes.draw(rng, SIZE, shapes.parse(p))) for p in prompts])
    return ({"generated": readback.adherence(reader, images, prompts), "drawn": readback.adherence(reader, drawn, prompts),
             "sampler": "pndm, 50 steps, guidance 7.5", "size": SIZE}, images, prompts)


def figure(losses: dict[str, list[float]], trip: torch.Tensor, images: torch.Tensor, path: Path) -> None:
    """Loss curves; 16 real phantoms above their VAE round trips; the check's images. Pixels shown 4x (nearest)."""
    smooth = {name: (list(range(0, len(v), 20)), [float(np.mean(v[i:i + 20])) for i in range(0, len(v), 20)])
              for name, v in losses.items()}
    curves = [plots.line_plot({name: series}, title=f"{name} loss", xlabel="step", ylabel="loss")
              for name, series in smooth.items()]
    def big(stack):
        return [sheets.enlarged(sheets.to_pil(im)) for im in stack]
    panels = [("real phantoms (above) and their VAE round trips (below)", sheets.grid(big(trip), columns=16)),
              ("the check: 8 images of each held-out shapes caption, one caption per half row", sheets.grid(big(images), columns=16))]
    fnt = plots.font(16)
    width = max(sum(c.width for c in curves), *(p.width for _, p in panels))
    height = max(c.height for c in curves) + sum(p.height + 30 for _, p in panels)
    out = Image.new("RGB", (width, height), "white")
    x = 0
    for c in curves:
        out.paste(c, (x, 0))
        x += c.width
    y = max(c.height for c in curves)
    for title, panel in panels:
        ImageDraw.Draw(out).text((4, y + 6), title, fill="black", font=fnt)
        out.paste(panel, (0, y + 30))
        y += panel.height + 30
    plots.save_png(out, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/tiny-sd", help="the diffusers folder to write")
    p.add_argument("--readers", default="assets/readers", help="folder for the readers")
    p.add_argument("--figure", default="docs/tiny-sd.png", help="loss curves and the check's images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=16000, help="base-domain training images")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--reader-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--check-images", type=int, default=8, help="images per held-out combination in the check")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("images", "vae_steps", "unet_steps", "reader_steps", "batch", "check_images", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights and gradients as denormals slow a CPU several times over
    out, readers = Path(args.out), Path(args.readers)
    started, timings = time.time(), {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    def log(msg):
        print(f"[{time.time() - started:7.1f} s] {msg}", flush=True)

    vocab, merges = learn_bpe(corpus())
    tokenizer = Tokenizer(vocab, merges, source="learned BPE")
    log(f"tokenizer: {len(merges)} merges, {len(vocab)} ids")

    readers.mkdir(parents=True, exist_ok=True)
    for i, domain in enumerate(readback.DOMAINS):
        reader = readback.train_reader(domain, args.reader_steps, seed=args.seed + 4 + i, log=log)
        readback.save_reader(reader, readers / f"{domain}.safetensors")
    timings["readers_s"] = round(time.time() - started, 1)

    vae, vae_losses = train_vae(args.vae_steps, args.batch, args.seed, log)
    images, captions = base_data(args.images, args.seed + 1)
    scale = rescale_latents(vae, images[:512])
    with torch.no_grad():
        posterior = [vae.encode(images[i:i + 256]) for i in range(0, len(images), 256)]
    mean, logvar = torch.cat([m for m, _ in posterior]), torch.cat([lv for _, lv in posterior])
    trip, trip_images = round_trip(vae, readback.load_reader(readers / "phantoms.safetensors"))
    timings["vae_s"] = round(time.time() - started - timings["readers_s"], 1)
    log(f"vae: latents rescaled by {scale:.4f}; {len(images)} base images encoded; phantoms' round trip {trip}")

    torch.manual_seed(args.seed + 2)
    text_config = CLIPTextConfig(**{**TEXT.__dict__, "vocab_size": len(vocab), "eos_token_id": tokenizer.end_id})
    sd = SD15(UNet(UNET), CLIPTextModel(text_config), tokenizer, vae, name="tiny-sd (training)")
    ids = tokenizer.encode(captions)[0]
    diff_losses, sd.unet, sd.text_encoder = train_diffusion(sd, mean, logvar, ids, args.unet_steps, args.batch,
                                                            args.seed + 3, log)
    timings["diffusion_s"] = round(time.time() - started - timings["vae_s"] - timings["readers_s"], 1)

    result, check_images, _ = check(sd, readback.load_reader(readers / "shapes.safetensors"), args.check_images, args.seed)
    log(f"check: adherence on held-out captions {result['generated']['adherence']:.3f} "
        f"(drawn images: {result['drawn']['adherence']:.3f}); per attribute {result['generated']['per_attribute']}")
    save_sd15(sd, out, merges)
    record = {"command": "python tools/pretrain_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "seed": args.seed, "threads": args.threads, "native_size": SIZE,
              "options": vars(args), "timings": {**timings, "total_s": round(time.time() - started, 1)},
              "latent_rescale": scale, "vae_round_trip": trip, "check": result,
              "loss_every_50_steps": {"vae": [float(np.mean(vae_losses[i:i + 50])) for i in range(0, len(vae_losses), 50)],
                                      "diffusion": [float(np.mean(diff_losses[i:i + 50])) for i in range(0, len(diff_losses), 50)]}}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    figure({"VAE": vae_losses, "diffusion": diff_losses}, trip_images, check_images, Path(args.figure))
    log(f"wrote {out}, {readers} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
