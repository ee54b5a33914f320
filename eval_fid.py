"""Image-quality metrics of the paper: FID (Inception features of 2048, 768, 192 or 64 dimensions), KID, CLIP score.

FID (Heusel et al. 2017) fits a Gaussian to the Inception features of each image set and measures
    FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))
equal to pytorch-fid's figure within 1e-6 relative, so numbers are comparable with papers that used it:
float64 statistics, and the trace of the square root from the eigenvalues of a symmetric matrix
(metrics/fid_kid.py: `trace_sqrt_product`), about 1 s at 2048 dimensions where pytorch-fid's scipy sqrtm takes 10 s or more;
`--fid-sqrtm exact` computes it as pytorch-fid does (`trace_sqrtm`). FID is biased upwards for small sets and its
covariance is singular when there are no more images than feature dimensions: we warn then, and also report
KID (Binkowski et al. 2018), the unbiased squared MMD with the cubic polynomial kernel, averaged over random
subsets, as torchmetrics computes it.

For the tiny pretrained model's phantoms, `--reader assets/readers/phantoms.safetensors` takes the features of a
small classifier of the domain instead of Inception's (phantom-FID), and reads each image's attributes back to
score caption adherence, the CLIP score's analogue (metrics/readback.py).

CLIP score (Hessel et al. 2021): 100 * cos(image embedding, text embedding) with CLIP ViT-L/14, per pair,
averaged. torchmetrics clamps the mean at 0, the CLIPScore paper clamps each pair (with weight 2.5 there,
100 here): both are reported, `clip_score` is torchmetrics' figure.

    python eval_fid.py --real DIR --fake DIR --inception pt_inception-2015-12-05-6726825d.pth \
        [--dims 2048 192 64] [--clip openai-clip-vit-large-patch14/ --prompts prompts.txt] [--json OUT]
        [--fid-sqrtm eigh|exact]
    python eval_fid.py --runs RUN... --inception FILE [--real DIR] [--table OUT]   (see run_images)
    python eval_fid.py --runs RUN... --reader assets/readers/phantoms.safetensors   (phantom-FID, adherence)
        [--scheduler pndm --sample-steps 50]   (the sampler of a run's test images, when they are generated here)

FID depends on the sampler: each report names the one that made the images (their folder's sampling.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from metrics import clip_image, inception, intervals, readback
from metrics.fid_kid import FID_SQRTM, fid_kid
from model import clip_tokenizer, sampling
from model.sd15 import generate
from model.weights import atomic_write
from evaluation import heldout, tables
from training import cli, run_folder
import clip_text

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's
NOT_SAMPLES = ("grid.png",)  # the contact sheet sample.py writes beside its images


# ---------------------------------------------------------------- images

def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (pytorch-fid's extensions, any case), sorted by name,
    leaving out sample.py's grid.png."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in NOT_SAMPLES)
    if not files:
        raise ValueError(f"{folder}: no images in it (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return files


def enough(files: list[Path], what: str) -> list[Path]:
    """`files`, refused when fewer than the 2 images a covariance (FID) and KID's subsets need; `what` names the
    option and folder."""
    if len(files) < 2:
        raise ValueError(f"{what}: {len(files)} image in {files[0].parent}; FID and KID need at least 2 images per set")
    return files


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB (grey and 16-bit scans converted as PIL does, like pytorch-fid)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read this image ({err})") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1] (torchvision's ToTensor)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def batches(files: list[Path], batch_size: int, desc: str):
    """Yield (start index, files) in runs of `batch_size`, with a progress bar over images."""
    with tqdm(total=len(files), desc=desc, unit="img", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            yield start, chunk
            bar.update(len(chunk))


# ---------------------------------------------------------------- features

@torch.no_grad()
def inception_features(model: inception.InceptionV3, files: list[Path], dims: tuple[int, ...],
                       batch_size: int = 50, device: str | torch.device = "cpu",
                       desc: str = "inception") -> dict[int, np.ndarray]:
    """{dim: (n, dim) float64 array} of Inception features for each image file."""
    out = {d: [] for d in dims}
    for _, chunk in batches(files, batch_size, desc):
        # resized one by one so images of different sizes can share a batch; same result as batched
        x = torch.cat([inception.preprocess(to_tensor(read_image(f))[None]) for f in chunk]).to(device)
        for d, f in model.features(x, dims).items():
            out[d].append(f.double().cpu().numpy())
    return {d: np.concatenate(v) for d, v in out.items()}


@torch.no_grad()
def reader_features(reader: readback.Reader, files: list[Path], batch_size: int = 50,
                    device: str | torch.device = "cpu", desc: str = "reader") -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """({domain: (n, 64) float64 array} of a reader's bounded features (metrics/readback.py), and the images
    as read, for adherence."""
    images = torch.stack([readback.to_tensor(read_image(f).resize((readback.SIZE, readback.SIZE), Image.BICUBIC))
                          for _, chunk in batches(files, batch_size, desc) for f in chunk]).to(device)
    return {reader.domain: features_of(reader, images, batch_size)}, images


@torch.no_grad()
def features_of(reader: readback.Reader, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(n, 64) float64 bounded features of images (n, 3, H, W) in [-1, 1] on the reader's device."""
    return torch.cat([reader.features(images[i:i + batch_size]).double().cpu()
                      for i in range(0, len(images), batch_size)]).numpy()


# ---------------------------------------------------------------- a reader's scores, with intervals

def reader_scores(reader: readback.Reader, real: np.ndarray, fake: np.ndarray, images: torch.Tensor | None,
                  prompts: list[str] | None, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID on a reader's bounded features (real and fake, (n, 64)), and the fake images' caption adherence
    per attribute where prompts are given; each with its bootstrap 95% interval (metrics/intervals.py)."""
    report = fid_kid({reader.domain: real}, {reader.domain: fake}, kid_subsets, kid_subset_size, seed)
    report["intervals"] = {f"FID-{reader.domain}": intervals.fid_interval(real, fake, seed=seed),
                           "KID": intervals.kid_interval(real, fake, seed=seed)}
    if prompts:
        report["adherence"] = readback.adherence(reader, images, prompts, seed=seed)
    return report


def intervals_of(report: dict) -> dict[str, list[float]]:
    """A report's bootstrap 95% intervals (a reader's), keyed as the tables' columns and by attribute."""
    out = dict(report.get("intervals", {}))
    if "interval" in report.get("adherence", {}):
        out.update({"adherence": report["adherence"]["interval"], **report["adherence"]["per_attribute_interval"]})
    return out


# ---------------------------------------------------------------- CLIP score

def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (UTF-8), in the order of the sorted image files."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the prompts file ({err})") from None


@torch.no_grad()
def clip_score(image_encoder, text_encoder, tokenizer, files: list[Path], prompts: list[str],
               batch_size: int = 32, device: str | torch.device = "cpu") -> dict:
    """CLIP score of image i against prompt i: 100 * cos(image embedding, text embedding), averaged.

    `clip_score` is torchmetrics' figure, max(mean, 0); `clip_score_pair_clamped` the CLIPScore paper's
    mean of max(pair, 0) (without its 2.5 weight). Prompts longer than the 77-token context are cut to
    their first 75 tokens plus the end token, and counted in `truncated_prompts`. (torchmetrics 1.9 cuts
    such prompts after 77 tokens, losing the end token that CLIP pools at: its scores for long prompts
    differ from these, which equal its scores for the prompts cut as here.)
    """
    if len(files) != len(prompts):
        raise ValueError(f"CLIP score: {len(files)} images but {len(prompts)} prompts; "
                         "give exactly one prompt line per image (sorted by file name)")
    scores, truncated = [], 0
    for start, chunk in batches(files, batch_size, "clip"):
        pixels = torch.stack([clip_image.preprocess(read_image(f)) for f in chunk]).to(device)
        ids, cut = tokenizer.encode(prompts[start:start + len(chunk)])
        truncated += cut
        image = image_encoder(pixels).double()
        text = text_encoder.project(text_encoder.encode(ids.to(device))[1]).double()
        scores.append(100 * (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1).cpu())
    scores = torch.cat(scores)
    return {"clip_score": max(scores.mean().item(), 0.0), "clip_score_pair_clamped": scores.clamp(min=0).mean().item(),
            "pairs": len(scores), "truncated_prompts": truncated}


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(image encoder, text encoder with projection, tokenizer) from a transformers CLIPModel folder
    (model.safetensors, config.json, vocab.json, merges.txt) or its model.safetensors."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return (clip_image.load_image_encoder(path).to(device), clip_text.load_text_encoder(path).to(device),
            clip_tokenizer.load_tokenizer(folder))


# ---------------------------------------------------------------- runs: the paper's Table 1/2 layout

RUN_INFO = "run.json"  # RUN/run.json: {"method": "selora", "seed": 0, ...} for a folder train.py did not make


def run_info(run: Path) -> tuple[str, str]:
    """(method, seed) of a run folder: a train.py run's options, else RUN/run.json, else (folder name, "")."""
    if run_folder.is_run_folder(run):
        options = run_folder.read_options(run)
        return str(options["method"]), str(options["seed"])
    info_file = run / RUN_INFO
    if not info_file.is_file():
        return run.name, ""
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        return str(info["method"]), str(info.get("seed", ""))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{info_file}: expected a JSON object with a 'method' (and 'seed'), got an error: {err!r}") from None


def run_images(run: Path, with_prompts: bool, device: str = "cpu", scheduler: str = "pndm",
               steps: int = 50) -> tuple[Path, list[Path], list[str] | None]:
    """(run folder, its test-split image files, their prompts if asked for). A finished train.py run whose images
    are not there yet, or were made by another sampler, gets them now (heldout.ensure_test_split)."""
    folder = run / heldout.SAMPLES
    if run_folder.is_run_folder(run) and (run / "best.safetensors").is_file():
        test = run_folder.read_split(run)[1]["test"]
        if len(test) < 2:  # before generating anything
            raise ValueError(f"--runs {run}: its test split ({run / run_folder.SPLIT}) has {len(test)} image(s); FID "
                             "and KID need at least 2 per set")
        with run_folder.lock(run, "eval_fid.py --runs"):
            heldout.ensure_test_split(run, steps, device=device, scheduler=scheduler)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; generate the run's test-split images with sample.py first "
                                "(done here for a finished train.py run, which has config.json and best.safetensors)")
    return run, list_images(folder), read_prompts(folder / heldout.PROMPTS) if with_prompts else None


# ---------------------------------------------------------------- command line

def report_lines(report: dict) -> list[str]:
    """The figures of one real-vs-fake comparison as an aligned text table."""
    n = report["images"]
    kid_ = report["kid"]
    rows = [("images", f"real {n['real']}, fake {n['fake']}"),
            ("fake made by", sampling.describe(report["sampling"]))]
    ci = report.get("intervals", {})  # a reader's: bootstrap 95% intervals
    rows += [(f"FID ({d})", f"{v:.4f}" + interval(ci.get(f"FID-{d}"))) for d, v in report["fid"].items()]
    rows.append((f"KID ({kid_['dims']})", f"{kid_['mean']:.6f} ± {kid_['std']:.6f} "
                                           f"({kid_['subsets']} subsets of {kid_['subset_size']})"
                 + interval(ci.get("KID"), ".6f")))
    if "adherence" in report:
        a = report["adherence"]
        rows.append(("adherence", f"{a['adherence']:.4f}{interval(a['interval'])} ({a['images']} images)"))
        rows += [(f"  {k}", f"{v:.3f}{interval(a['per_attribute_interval'][k], '.3f')}")
                 for k, v in a["per_attribute"].items()]
    if "clip" in report:
        c = report["clip"]
        rows.append(("CLIP score", f"{c['clip_score']:.4f} (pairs clamped: {c['clip_score_pair_clamped']:.4f}; "
                                   f"{c['truncated_prompts']} of {c['pairs']} prompts truncated to 77 tokens)"))
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def interval(bounds: list[float] | None, fmt: str = ".4f") -> str:
    """" [low, high] 95%" for a bootstrap interval; "" where there is none."""
    return f" [{bounds[0]:{fmt}}, {bounds[1]:{fmt}}] 95%" if bounds else ""


def flat_metrics(report: dict) -> dict[str, float]:
    """The headline numbers of one report, named as the run tables' columns."""
    out = {f"FID-{d}": v for d, v in report["fid"].items()}
    out["KID"] = report["kid"]["mean"]
    if "clip" in report:
        out["CLIP score"] = report["clip"]["clip_score"]
    if "adherence" in report:
        out["adherence"] = report["adherence"]["adherence"]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", help="folder of real (reference) images; with --runs of train.py, default: each "
                                  "run's own held-out test images (RUN/real/, written with its samples)")
    p.add_argument("--fake", help="folder of generated images")
    p.add_argument("--runs", nargs="+", help="run folders: score RUN/samples/ of each (instead of --fake)")
    p.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a safetensors copy")
    p.add_argument("--reader", help="instead of --inception: a domain reader (metrics/readback.py, e.g. "
                                    "assets/readers/phantoms.safetensors): FID and KID on its features "
                                    "(phantom-FID) and, with prompts, caption adherence in place of the CLIP score")
    p.add_argument("--dims", type=int, nargs="+", default=[2048], choices=inception.DIMS,
                   help="Inception feature widths to compute FID with; KID uses the widest")
    p.add_argument("--clip", help="transformers CLIPModel folder (openai/clip-vit-large-patch14) for the CLIP score")
    p.add_argument("--prompts", help="prompts file for --fake, one line per image in file-name order (CLIP score, or "
                                     "adherence with --reader)")
    p.add_argument("--fid-sqrtm", default="eigh", choices=FID_SQRTM,
                   help="FID's tr sqrt(S1 S2): from eigenvalues (about 1 s at 2048 dims), or pytorch-fid's scipy "
                        "sqrtm (10 s or more); equal within 1e-6 relative")
    p.add_argument("--kid-subsets", type=cli.integer(1), default=100)
    p.add_argument("--kid-subset-size", type=cli.integer(2), default=1000,
                   help="images per KID subset, >= 2 (an MMD needs two); half the smaller set where a set is not "
                        "larger than this")
    p.add_argument("--seed", type=cli.integer(0, cli.SEEDS - 1), default=0, help="seed of the KID subsets")
    p.add_argument("--batch-size", type=cli.integer(1), default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--table", help="with --runs: write the table to TABLE.md and TABLE.csv")
    p.add_argument("--scheduler", default="pndm", choices=sampling.SCHEDULERS,
                   help="with --runs: the sampler of test images generated here (pndm: SD 1.5's, the paper's)")
    p.add_argument("--sample-steps", type=cli.integer(1, sampling.MAX_STEPS), default=50,
                   help="with --runs: the sampler's steps for test images generated here")
    args = p.parse_args(argv)
    if (args.fake is None) == (args.runs is None):
        p.error("give exactly one of --fake and --runs")
    if (args.inception is None) == (args.reader is None):
        p.error("give exactly one feature extractor: --inception FILE or --reader FILE")
    if args.reader and args.clip:
        p.error("--clip goes with --inception; a --reader's own score is caption adherence")
    if args.fake and not args.real:
        p.error("--fake needs --real")
    if args.prompts and not (args.clip or args.reader) or args.clip and args.fake and not args.prompts:
        p.error("the CLIP score needs both --clip and --prompts (with --runs: --clip, prompts from each run)")
    if args.table and not args.runs:
        p.error("--table goes with --runs")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Score --fake (or each of --runs) against --real; print a table, write --json (and --table). A bad folder
    or file (missing, empty, unreadable image) ends the command with one line and status 2."""
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (ValueError, OSError) as err:  # the message names the folder or file
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def evaluate(args: argparse.Namespace) -> dict:
    dims = tuple(sorted(set(args.dims)))
    real_files = list_images(args.real) if args.real else None
    runs = [Path(r) for r in args.runs or []]
    # every input is checked before the first image goes through a network
    if real_files is not None:
        enough(real_files, f"--real {args.real}")
    if args.fake:
        targets = [(Path(args.fake), enough(list_images(args.fake), f"--fake {args.fake}"),
                    args.prompts and read_prompts(args.prompts))]
    else:
        targets = [run_images(run, bool(args.clip or args.reader), args.device, args.scheduler, args.sample_steps)
                   for run in runs]
        infos = [run_info(run) for run in runs]
    reader = readback.load_reader(args.reader).to(args.device) if args.reader else None
    for folder, files, prompts in targets:
        enough(files, f"--runs {folder}" if args.runs else str(folder))
        if args.runs and not args.real:
            enough(list_images(folder / heldout.REAL), f"--runs {folder}")
        if prompts and len(prompts) != len(files):
            raise ValueError(f"{folder}: {len(files)} images but {len(prompts)} prompts; give exactly one prompt line "
                             "per image (sorted by file name)")
        for prompt in (prompts or []) if reader else []:
            readback.DOMAINS[reader.domain].parse(prompt)  # a prompt the reader cannot check is refused now
    model = inception.load_inception(args.inception).to(args.device) if args.inception else None
    clip = load_clip(args.clip, args.device) if args.clip else None

    def features(files, desc):  # (features by width or domain, the images as the reader read them)
        if reader:
            return reader_features(reader, files, args.batch_size, args.device, desc)
        return inception_features(model, files, dims, args.batch_size, args.device, desc), None
    real_sets = {}  # real folder -> features, computed once per folder
    reports = []
    for folder, files, prompts in targets:
        real_folder = Path(args.real) if args.real else folder / heldout.REAL  # --runs: the run's held-out images
        if real_folder not in real_sets:
            real_sets[real_folder] = features(real_files or list_images(real_folder), "real")[0]
        real = real_sets[real_folder]
        fake, images = features(files, folder.name)
        made = sampling.read_settings(files[0].parent)  # the images' own folder (with --runs: RUN/samples)
        report = {"real": str(real_folder), "fake": str(folder), "sampling": made,
                  "features": f"reader of {reader.domain}" if reader else "inception"}
        if reader:
            report.update(reader_scores(reader, real[reader.domain], fake[reader.domain], images, prompts,
                                        args.kid_subsets, args.kid_subset_size, args.seed))
        else:
            report.update(fid_kid(real, fake, args.kid_subsets, args.kid_subset_size, args.seed, args.fid_sqrtm))
        if clip:
            report["clip"] = clip_score(*clip, files, prompts, args.batch_size, args.device)
        print(f"\n{folder}\n" + "\n".join(report_lines(report)))
        reports.append(report)
    result = reports[0] if args.fake else {"runs": reports}
    if args.runs:
        rows = [{"method": m, "seed": s, **flat_metrics(r), "intervals": intervals_of(r)}
                for r, (m, s) in zip(reports, infos)]
        metrics = list(flat_metrics(reports[0]))
        result["table"] = summary = tables.summarise(rows, metrics)
        markdown, csv_text = tables.markdown_and_csv(summary, metrics)
        samplers = sorted({sampling.describe(r["sampling"]) for r in reports})
        markdown += f"\nTest images made by {'; '.join(samplers)}.\n"
        print("\n" + markdown)
        if args.table:
            for suffix, text in ((".md", markdown), (".csv", csv_text)):
                with atomic_write(args.table + suffix, "w") as f:
                    f.write(text)
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
