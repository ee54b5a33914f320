"""The paper's fine-tuning run (section 3.5): SD 1.5 frozen, adapters in every linear layer of the UNet and the
text encoder, trained on image-report pairs with the diffusion loss.

    python train.py                    # embedded default: the tiny pretrained SD and generated phantoms, minutes on a CPU
    python train.py --model SD15 --data IU_XRAY --dataset iu-xray --method selora --out runs/iu-selora
    python train.py --resume runs/iu-selora

This file holds the run's options, their checks and its set-up (`start`) and end (`export_best`). The loop of steps
is training/train_loop.py, one step training/diffusion.py's `train_step`: encode the prompts with the text
encoder, draw t uniformly from the 1000 training timesteps and noise, and minimise the MSE between the UNet's
predicted and the true noise (the batch mean of per-sample MSEs). The method's controller does its work around that
step (SeLoRA, selora.py: an expansion test every t steps, section 3.2). After each epoch the validation loss is
measured and the best adapter kept.

The run folder gets config.json, split.json, log.jsonl, summary.json, figures (PNG), best/last adapters, a
kohya-format export, checkpoints for --resume, and a few samples.

Several processes (GPUs, machines) train one run data-parallel when torchrun launches it; --batch is then each
process's batch (fast/distributed.py):

    torchrun --nproc_per_node 4 train.py --model SD15 --data IU_XRAY --dataset iu-xray --batch 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from data import datasets, phantoms, splits
from fast import capacity, distributed, torch_compile
from methods import adapters
from methods.kohya import export_kohya
from metrics import readback
from model import sampling, weights
from model.sampling import GUIDANCE, MAX_STEPS, SCHEDULERS
from model.sd15 import SD15, generate, load_model
from training import checkpoint, cli, diffusion, method_table, run_folder, sheets
from training.train_loop import Training, TrainingError, base_metadata, finish, fit
from evaluation import phantom_scores

PAPER_EPOCHS = {"iu-xray": 10, "montgomery": 100}  # section 3.5 (paper:148); other data sets default to 10
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the embedded default (docs/tiny-sd.md, "How the recipe was chosen"): 2000 phantoms, 1600 of them for training, 8
# epochs of 200 steps, so t = 80 gives 20 tests; the tiny model learns the phantoms at lr 1e-3, not at the authors'
# 1e-4, its images saturate at guidance 7.5, and 400 phantoms were too few to bind the lobes to their words
EMBEDDED = dict(size=32, epochs=8, images=2000, lr=1e-3, guidance=3.0, caption_dropout=0.0, t=80)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="SD 1.5: diffusers folder or single-file .safetensors (default: the embedded tiny model pretrained on shapes, assets/tiny-sd)")
    a("--tokenizer", help="tokenizer folder or bpe_simple_vocab_16e6.txt.gz (needed with a single-file checkpoint)")
    a("--data", help="data folder (default: generated phantoms, see phantoms.make_phantom_folder)")
    a("--phantoms", type=cli.integer(2), help=f"without --data: how many phantoms to generate (default "
                                              f"{EMBEDDED['images']})")
    a("--dataset", default="folder", choices=sorted(datasets.PAPER_SPLITS), help="layout of --data (default: folder)")
    a("--split", help="train,validation,test percentages (default: the paper's for the data set, e.g. 80,16,4)")
    a("--empty-findings", default="skip", choices=("skip", "impression"), help="IU X-Ray reports without findings")
    a("--per-subtype", type=cli.integer(1), help="PatchGastric: sample this many pairs per subtype (appendix C.2: 1000)")
    a("--method", default="selora", choices=method_table.METHODS, help="adapter method (default: selora)")
    a("--targets", nargs="+", help="glob patterns of linear layers to adapt (default: every nn.Linear, as the paper)")
    method_table.add_options(p)  # each method's own: --lam, --t, --fisher (SeLoRA), --rank, --init-r, ...
    a("--size", type=cli.image_size, help="image size in pixels, a multiple of 8 (paper: 224, 384 as an option; embedded "
                                f"default: {EMBEDDED['size']})")
    a("--epochs", type=cli.integer(1), help="epochs (paper: 10 for IU X-Ray, 100 for Montgomery)")
    a("--batch", type=cli.integer(1), default=8,
      help="batch size per process (8: the authors' script's, its line 95; the paper's table 4 was lost in "
           "extraction, and its appendix C uses 6 at 384 px; under torchrun the global batch is this times the "
           "number of processes)")
    a("--lr", type=cli.number(0.0, inclusive=False),
      help=f"learning rate (default 1e-4: the authors' script's, its line 96; embedded default {EMBEDDED['lr']:g})")
    a("--optimizer", default="adam", choices=("adam", "adamw"),
      help="Adam: the authors' script's (its line 450; the paper's table 4 was lost)")
    a("--weight-decay", type=cli.number(0.0), default=0.0)
    a("--caption-dropout", type=cli.number(0.0, high=1.0),
      help="share of training captions replaced by the empty one, for classifier-free guidance (default 0: the paper's "
           f"and the script's; embedded default {EMBEDDED['caption_dropout']:g})")
    add_hardware_options(a)  # precision, memory and speed: --precision ... --timeout
    a("--seed", type=cli.integer(0, cli.SEEDS - 1), default=0)
    a("--data-seed", type=cli.integer(0, cli.SEEDS - 1),
      help="seed of the split and of the data's sampling (default: --seed); reproduce.py gives all its runs one, so "
           "every method and seed shares one split")
    a("--out", help="run folder (default: runs/default, or runs/<method>-<dataset>-seed<seed>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing run folder (only a folder train.py made; see docs/reliability.md)")
    again.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint "
                                                       "(from step 0 if it has none yet)")
    a("--allow-data-change", action="store_true",
      help="with --resume: train on data (images, captions) that changed since the run started, instead of refusing; "
           "the changes are recorded in split.json")
    a("--checkpoint-every", type=cli.integer(1), default=500, help="steps between checkpoints (also at each epoch end)")
    a("--latent-cache", help="folder for cached VAE latents (default: <run folder's parent>/.latent-cache)")
    a("--samples", type=cli.integer(0), default=4, help="preview images to generate from test prompts at the end, by the base model and the fine-tuned one (0: "
                                    "none, and no phantom scores)")
    a("--scheduler", default="pndm", choices=SCHEDULERS,
      help="sampler of those samples (default pndm: SD 1.5's, which made the paper's images)")
    a("--sample-steps", type=cli.integer(1, MAX_STEPS), default=50, help="sampler steps for those samples (default 50)")
    a("--guidance", type=cli.guidance, help="classifier-free guidance of those samples, 0 to 100 (default 7.5: "
                                            f"StableDiffusionPipeline's; embedded default {EMBEDDED['guidance']:g})")
    a("--stop-after", type=cli.integer(1), help=argparse.SUPPRESS)  # tests: interrupt after this many steps
    return p


def add_hardware_options(a) -> None:
    """The options of how a run uses its machine (precision, memory, compiling, processes), which change its speed
    and memory but not what it learns (beyond rounding)."""
    a("--precision", default="fp32", choices=sorted(PRECISIONS),
      help="frozen weights' precision; adapters and optimizer stay fp32 (default fp32)")
    a("--gradient-checkpointing", action="store_true",
      help="recompute the activations of the UNet's blocks and the text encoder's layers in backward instead of "
           "keeping them: less memory, more time, the same results")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="train through a torch.compile'd UNet and text encoder (inductor; on a CPU it needs g++), the adapters "
           "stored at a fixed capacity (--max-rank) so that changing ranks never recompile: the same results at the "
           "same --max-rank. SeLoRA has no maximum rank unless given, so --compile sets --max-rank 16, which "
           "changes growth for any layer that would pass 16 (said when the run starts; give --max-rank to choose). "
           "It pays where steps are bound by kernel launches, as on a GPU (on a CPU it was slower: "
           "docs/launch-bound.md). A run's first SeLoRA test step runs uncompiled, later ones compiled. --no-compile resumes a compiled run without")
    a("--compile-mode", default="default", choices=torch_compile.COMPILE_MODES,
      help="with --compile: default (inductor's kernels), or reduce-overhead: the same kernels with each step's "
           "launches recorded once as CUDA graphs and replayed (CUDA only; the same results; pays where a step is "
           "bound by kernel launches). A resumed run may change it")
    a("--fast-test-step", action=argparse.BooleanOptionalAction, default=False,
      help="SeLoRA's test step the fast way (fast/fisher.py): the per-sample gradients of all layers of equal shapes "
           "at once, probes in place of hooks; the same decisions as the literal test step of selora.py, which runs "
           "by default (the FI-ratios agree to rounding). --compile and torchrun take it always. A resumed run may "
           "change it")
    a("--device", type=cli.device, help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    a("--timeout", type=cli.number(0.0, inclusive=False), default=30.0,
      help="torchrun: minutes a process waits for the others in a collective before the run fails (default 30)")


# ------------------------------------------------------------------------------------------ set-up

def given_options(p: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The options the command line names explicitly (not those left at their defaults)."""
    unset = object()
    blank = argparse.Namespace(**{key: unset for key in vars(p.parse_args([]))})
    return {k: v for k, v in vars(p.parse_args(argv, namespace=blank)).items() if v is not unset}


def resolve(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill the defaults that depend on other options; a resumed run takes its own
    config.json (`resumed`). Problems with the run folder raise run_folder.RunFolderError."""
    p = parser()
    args = p.parse_args(argv)
    if args.resume:
        return resumed(p, argv, Path(args.resume))
    if args.allow_data_change:
        raise ValueError("--allow-data-change goes with --resume: a new run takes its data as it is")
    if args.phantoms is not None and args.data is not None:
        raise ValueError(f"--phantoms {args.phantoms}: the number of generated phantoms, which --data replaces; give one")
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} goes with --compile")
    given = given_options(p, argv)
    foreign = method_table.not_taken(args.method, given)
    if foreign:
        own = ", ".join(map(cli.flag, method_table.taken(args.method))) or "none"
        raise ValueError(f"{', '.join(map(cli.flag, foreign))}: not an option of --method {args.method}, which "
                         f"would ignore it (its own: {own})")
    embedded = args.model is None
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.size = args.size or (EMBEDDED["size"] if embedded else 224)
    if args.data is None:
        args.phantoms = args.phantoms or EMBEDDED["images"]
    phantoms_default = embedded and args.data is None
    args.lr = args.lr or (EMBEDDED["lr"] if phantoms_default else 1e-4)
    if phantoms_default and args.method == "selora" and "t" not in given:
        args.t = EMBEDDED["t"]
    if args.caption_dropout is None:
        args.caption_dropout = EMBEDDED["caption_dropout"] if phantoms_default else 0.0
    if args.guidance is None:
        args.guidance = EMBEDDED["guidance"] if phantoms_default else GUIDANCE
    args.epochs = args.epochs or (EMBEDDED["epochs"] if phantoms_default else PAPER_EPOCHS.get(args.dataset, 10))
    args.out = args.out or ("runs/default" if phantoms_default
                            else f"runs/{args.method}-{args.dataset}-seed{args.seed}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in method_table.rule_defaults(args.expansion_test).items():  # SeLoRA's, recorded in config.json
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile and args.max_rank is None:  # a fixed capacity needs a maximum rank (SeLoRA: none by default)
        args.max_rank = method_table.TABLE[args.method].compiled_max_rank
        if args.method == "selora" and distributed.is_main():
            print(f"--compile: SeLoRA's layers stop growing at --max-rank {args.max_rank} (a fixed capacity needs a "
                  "limit; the paper sets none), so a layer that would pass it grows otherwise than without "
                  "--compile; give --max-rank to choose another", file=sys.stderr)
    run_folder.check_out(args.out, inputs(args))
    return args


def inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The paths a run reads, which its run folder must stay apart from (run_folder.check_out)."""
    return {"--data": args.data, "--model": args.model, "--tokenizer": args.tokenizer,
            "--latent-cache": args.latent_cache}


def resumed(p: argparse.ArgumentParser, argv: list[str] | None, run: Path) -> argparse.Namespace:
    """The options of the run in `run`: its config.json's, with what may change in a resumed run taken from
    the command line (run_folder.resume_options), and its global batch shared by this run's processes."""
    config = run_folder.read_config(run)
    defaults, today = vars(p.parse_args([])), vars(p.parse_args(argv))
    given = {k: v for k, v in given_options(p, argv).items() if k != "resume"}
    options = run_folder.resume_options(run, config, defaults, given, today)
    options["batch"] = per_process_batch(run, options["batch"] * config.get("world_size", 1))
    if options["guidance"] is None:  # a run from before --guidance: its previews were made at the pipeline's
        options["guidance"] = GUIDANCE
    if options["data"] is None and options["phantoms"] is None:  # a run from before --phantoms (its are kept)
        options["phantoms"] = 400  # the embedded default's count then
    args = argparse.Namespace(**options)
    run_folder.check_out(run, inputs(args))
    return args


def per_process_batch(run: Path, global_batch: int) -> int:
    """A resumed run keeps its global batch, with any number of processes that divides it."""
    processes = distributed.world_size()
    if global_batch % processes:
        raise run_folder.RunFolderError(
            f"--resume {run}: its global batch is {global_batch}, which {processes} processes cannot share evenly; "
            f"launch a number of processes that divides {global_batch}")
    return global_batch // processes


def load_data(args: argparse.Namespace, run: Path, sd: SD15) -> tuple[datasets.DataSet, dict, diffusion.Examples, diffusion.Examples]:
    """The data set, its split (a new one written to RUN/split.json; a resumed run reads its own) and the
    training and validation parts as diffusion.Examples. The main process goes first: it writes the split, the
    phantoms and the latent cache, which the others then read."""
    with distributed.main_first():
        if not (run / run_folder.CONFIG).is_file():
            raise ValueError(f"process {distributed.rank()}: {run / run_folder.CONFIG} is not there: every machine "
                             "of a multi-machine run must see the run folder (--out on a shared file system)")
        root = Path(args.data) if args.data else run / "phantoms"
        if not args.data and distributed.is_main() and not (args.resume and (root / "metadata.jsonl").is_file()):
            phantoms.make_phantom_folder(root, args.phantoms, args.size, args.data_seed)  # a resumed run's are kept
        dataset = datasets.load_dataset(args.dataset, root, empty_findings=args.empty_findings,
                                    per_subtype=args.per_subtype, seed=args.data_seed)
        if (run / run_folder.SPLIT).is_file():
            split = splits.read_split(run / run_folder.SPLIT)
            if distributed.is_main():
                run_folder.check_data(run, dataset, split, args.allow_data_change)
        else:
            fractions = splits.parse_split(args.split) if args.split else datasets.PAPER_SPLITS[args.dataset]
            split = splits.make_split(dataset.examples, fractions, args.data_seed)
            splits.write_split(run / run_folder.SPLIT, split, {"data": str(root), "dataset": args.dataset,
                                                             "seed": args.data_seed, "fractions": list(fractions),
                                                             "fingerprints": splits.fingerprints(dataset.examples)})
        cache = Path(args.latent_cache) if args.latent_cache else run.parent / ".latent-cache"
        try:
            parts = [diffusion.Examples(sd, splits.select(dataset, split[part], run / run_folder.SPLIT), args.size,
                                        cache) for part in ("train", "validation")]
        except OSError as err:
            if err.filename is None or Path(err.filename).parent != cache:
                raise
            raise ValueError(f"--latent-cache {cache}: cannot write the cached latents there ({err.strerror}: "
                             f"{err.filename}); give --latent-cache a folder you can write to") from None
    if not len(parts[0]):
        raise ValueError(f"{run / run_folder.SPLIT}: the training part is empty")
    return dataset, split, *parts


def start(args: argparse.Namespace) -> Training:
    """The set-up: run folder, model, adapters, data and cached latents, optimizer, controller, and a resumed
    run's checkpoint. Every problem with the user's input surfaces here, before the first step; the
    run counts as started (config.json "started") only once all of it has succeeded."""
    fast = args.fast_test_step or args.compile or distributed.world_size() > 1  # SeLoRA's fast test step
    method = method_table.build(args.method, fast, **method_table.options(args.method, args))  # refuses clashes
    check_end(args)
    device = distributed.init(args.device, args.timeout)  # under torchrun; else torch.device(args.device)
    if args.compile:
        torch_compile.check_compiler(device, args.compile_mode)
    is_main = distributed.is_main()
    run = Path(args.out)
    if is_main and not args.resume:
        run_folder.prepare(run, args.overwrite)
        run_folder.write_config(run, vars(args), False, distributed.world_size())
    if is_main and args.resume:
        run_folder.recover_checkpoint(run)  # what a kill in the middle of a checkpoint left
    if is_main and args.model is None:
        print("Embedded default: a tiny SD 1.5 pretrained here on coloured shapes (assets/tiny-sd)"
              + (", fine-tuned on generated phantoms" if args.data is None else "") + ". For the paper's run give "
              "--model SD15_FOLDER_OR_FILE --data DATA --dataset iu-xray|montgomery|folder (see README).")
    torch.manual_seed(args.seed)  # adapter initialisation, the same in every process
    sd = load_model(args.model, args.tokenizer).to(device)
    sd.unet.gradient_checkpointing = sd.text_encoder.gradient_checkpointing = args.gradient_checkpointing
    if args.size % sd.latent_factor:
        raise ValueError(f"--size {args.size}: must be a multiple of {sd.latent_factor}, this model's VAE factor")
    parts = sd.adaptable()
    ckpt = run_folder.last_checkpoint(run) if args.resume else None
    if ckpt:
        named = adapters.load_adapters(parts, ckpt / "adapters.safetensors", method.make_adapter)[0]
    else:  # before the data, so that a --targets pattern matching nothing fails before the latents are encoded
        named = adapters.inject(parts, method.make_adapter, args.targets)
        method_table.check_ranks(args.method, named)  # a rank the export would refuse
    fractions = {part: adapters.trainable_fraction(getattr(sd, part))[2] for part in ("unet", "text_encoder")}
    dataset, split, train_ex, val_ex = load_data(args, run, sd)
    if args.precision != "fp32":  # frozen weights in low precision; adapters (trainable) stay fp32
        for p in parts.parameters():
            if not p.requires_grad:
                p.data = p.data.to(PRECISIONS[args.precision])
    parts.to(device)
    params = [p for p in parts.parameters() if p.requires_grad]
    groups = method_table.param_groups(args.method, named, args.lr, args)
    optimizer = method_table.optimizer(groups, args.optimizer, args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / (args.batch * distributed.world_size()))
    total_steps = steps_per_epoch * args.epochs
    controller = method.controller(named, optimizer, total_steps, distributed.all_reduce_sums)
    gen = torch.Generator().manual_seed(args.seed)
    counters = {"step": 0, "best_val_loss": math.inf, "best_epoch": -1, "elapsed": 0.0, "trainable_percent": fractions}
    if ckpt:
        names = {p: n for n, p in parts.named_parameters() if p.requires_grad}
        counters, extra = checkpoint.load_checkpoint(ckpt / "state.safetensors", optimizer, names, {"train": gen})
        controller.load_state(extra)
        counters.setdefault("trainable_percent", fractions)  # checkpoints written before it was carried
    compiled = None
    if args.compile:  # after loading: checkpoints hold the true ranks, which fix_capacity pads
        capacity.fix_capacity(controller, optimizer)
        compiled = torch_compile.compiled(sd, args.compile_mode)
    autocast = torch.autocast(device.type, PRECISIONS[args.precision], enabled=args.precision != "fp32")
    training = Training(args, run, device, is_main, sd, dataset, split, train_ex, val_ex, named, params, compiled,
                  optimizer, controller, autocast, gen, counters, steps_per_epoch, total_steps)
    if is_main:
        open_run(training, fractions, resumed_from=ckpt)
    return training


def check_end(args: argparse.Namespace) -> None:
    """What the end of the run needs beyond its own files, checked before step 1: the phantom reader that scores
    the embedded default's phantoms (evaluation/phantom_scores.py), a file of the project that may be missing or damaged."""
    if args.data is None and args.samples:
        try:
            readback.load_reader(readback.asset("phantoms"), "phantoms")
        except (ValueError, OSError) as err:
            raise ValueError(f"{err}. The run scores its phantoms with it at the end: restore it (git checkout -- "
                             "assets/readers), or give --samples 0") from None


def open_run(training: Training, fractions: dict[str, float], resumed_from: Path | None) -> None:
    """The main process's last step of the set-up: log.jsonl cut back to the step it starts from, summary.json
    removed, config.json marked started, and the run described (its notes, layers, trainable share and data)."""
    args, run, step = training.args, training.run, training.counters["step"]
    if args.resume:
        print(f"resuming {run} at step {step}" if resumed_from else
              f"resuming {run}: it has no checkpoint yet, so it starts again from step 0 with its saved options")
    log = run_folder.read_log(run, step)
    with weights.atomic_write(run / run_folder.LOG, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in log)
    (run / "summary.json").unlink(missing_ok=True)  # the run is unfinished until it writes it again
    run_folder.write_config(run, vars(args), True, distributed.world_size())
    for note in method_table.notes(args.method, args, training.total_steps):
        print(f"note: {note}")
    print(f"{args.method}: {len(training.named)} adapted layers; trainable {fractions['unet']:.3f}% of the UNet, "
          f"{fractions['text_encoder']:.3f}% of the text encoder; {len(training.train_ex)} training images, "
          f"{len(training.val_ex)} validation; {training.train_ex.truncated + training.val_ex.truncated} captions truncated to 77 tokens"
          + (f"; {distributed.world_size()} processes of batch {args.batch}" if distributed.world_size() > 1 else ""))


def export_best(args: argparse.Namespace, run: Path, dataset: datasets.DataSet, split: dict[str, list[str]]) -> dict:
    """Load the best adapter into a fresh model; export it in the kohya format, and generate a few images from
    held-out prompts, by the base model and by the fine-tuned one, beside the real images (run/previews/, one row
    each; eval_fid.py --runs generates the whole test split). On generated phantoms (no --data), returns their
    phantom-FID, KID and adherence before and after fine-tuning (evaluation/phantom_scores.py); else, or with --samples 0, {}."""
    sd = load_model(args.model, args.tokenizer).to(args.device)
    names = (split["test"] or split["validation"] or split["train"])[:args.samples]
    examples = splits.select(dataset, names, run / "split.json")
    prompts = [e.caption for e in examples]
    reference, score = phantom_scores.scorer(args) if args.data is None and args.samples else ({}, None)
    scores, rows = ({"real": reference} if reference else {}), []

    def score_and_preview(when: str) -> None:  # the model as it is now: its phantom scores and previews
        if score:
            scores[when] = score(sd)
        if args.samples:
            rows.append(generate(sd, prompts, args.sample_steps, args.guidance, seed=args.seed, size=args.size,
                                 batch=args.batch, scheduler=args.scheduler, progress=False))

    score_and_preview("before")
    best = method_table.load_adapter(sd, run / "best.safetensors")
    export_kohya(best, sd.unet.config, run / "best.kohya.safetensors", base_metadata(sd))
    sd.to(args.device)
    score_and_preview("after")
    if args.samples:
        real = torch.stack([datasets.load_image(e.path, args.size) for e in examples])
        sheets.write_images(torch.cat([real, *rows]), run / "previews", columns=len(examples),
                           rows=["real", "base model", "fine-tuned"], captions=prompts)
        sampling.write_settings(run / "previews", args.scheduler, args.sample_steps, args.guidance, 0.0, args.seed,
                                args.size)
        run_folder.write_json(run / "previews" / "prompts.json", {"real": names, "prompts": prompts,
                                                                  "rows": ["real", "base model", "fine-tuned"]})
    return scores


def main(argv: list[str] | None = None) -> int:
    """Run train.py; 2 for input a user must fix (said in one line, before any training), 1 for a run that
    stopped (a non-finite step, a failed write, another process's failure), 0 when done. The main process holds
    the run folder's lock (run_folder.lock) throughout."""
    try:
        with contextlib.ExitStack() as held:
            try:
                args = resolve(argv)
                if distributed.is_main():
                    held.enter_context(run_folder.lock(args.out, "train.py" + (" --resume" if args.resume else "")))
                training = start(args)
            except (ValueError, OSError) as err:  # bad options, files, folders: the message names them
                print(f"error: {err}", file=sys.stderr)
                return 2
            try:
                if fit(training) and training.is_main:
                    summary = finish(training)
                    run, dataset, split = training.run, training.dataset, training.split
                    del training  # the trained model's memory, before export_best loads a fresh one
                    scores = export_best(args, run, dataset, split)
                    run_folder.write_json(run / "summary.json",
                                          {**summary, "phantom_scores": scores} if scores else summary)
                    phantom_scores.print_scores(scores)
                    print(f"done: {run} (best epoch {summary['best_epoch']}, total rank {summary['total_rank']})")
            except OSError as err:  # a full disk or a file-size limit in a log line or the export: checkpoints are whole
                raise TrainingError(f"{err.strerror or err}: {err.filename or args.out}; the run is not finished. Make "
                                    f"room, then finish it with --resume {args.out}") from None
            distributed.barrier()  # the other processes wait for the main one's export, then all shut down together
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except distributed.Stopped as err:
        print(f"error: process {distributed.rank()} of {distributed.world_size()}: the run stopped because another "
              f"process failed or was stopped ({err}). torchrun's report names the first failure. Continue from the "
              f"last checkpoint with: torchrun --nproc_per_node N train.py --resume {args.out}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
