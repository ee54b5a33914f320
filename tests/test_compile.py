"""train.py --compile on the CPU (torch.compile with inductor, which builds C++ kernels; compiling takes seconds to a
minute here the first time, then comes from inductor's cache on disk): for every method, compiled training gives the
eager losses while ranks change, and no change of rank recompiles; SeLoRA's test steps run compiled from the second
on, in one more graph, with the eager Fisher scores and decisions; end to end through train.py, across resumes
with and without --compile.

Every method is compiled on a small attention block (test_selora.Block, six adapted layers), which compiles in
seconds; train.py end to end on a smaller SD 1.5 than the embedded tiny one (one UNet level, one text-encoder
layer), which compiles in about a minute.
"""
import dataclasses
import json

import pytest
import torch
from torch._dynamo.utils import counters

from fast import capacity, torch_compile
from methods import adapters
from model import weights
from model.sd15 import SD15, byte_tokenizer
from training import method_table
from clip_text import CLIPTextConfig, CLIPTextModel
from sd_unet import UNet, UNetConfig
import train
from test_methods import data
from test_selora import Block
from torch.utils.checkpoint import checkpoint
from vae import VAE, VAEConfig

STEPS = 30
# options under which every method changes its ranks (DyLoRA: its b) within STEPS steps
CHANGING = {
    "lora": {},
    "selora": {"lam": 1.001, "t": 3, "max_rank": 8},  # tested every 3 steps; grows to its maximum rank, 8
    "dylora": {"mode": "frozen"},
    "adalora": {"target_r": 2, "tinit": 3, "tfinal": 9, "delta_t": 3},  # masks every 3 steps, truncates at step 21
    "lora2": {"n_obs": 0.05, "max_rank": 6},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_steps(method: str, compile_: bool, checkpointed: bool = False):
    """STEPS steps of `method` on Block in float32, the loop of adapters.Controller with diffusion.train_step's
    choice of model (the uncompiled one where capture needs it: SeLoRA's first test step): the losses, each step's
    ranks (DyLoRA: its b), how many graphs had been compiled after each step, and SeLoRA's tests (its log).
    `checkpointed`: Block under gradient checkpointing (as sd_unet's blocks with --gradient-checkpointing)."""
    torch.manual_seed(0)
    model = Checkpointed() if checkpointed else Block()
    built = method_table.build(method, compile_, **CHANGING[method])  # compiled: SeLoRA's fast test step
    named = adapters.inject(model, built.make_adapter)
    args = train.parser().parse_args(["--method", method, "--rate-lr", "0.1"])
    optimizer = torch.optim.Adam(method_table.param_groups(method, named, 1e-2, args), lr=1e-2)
    controller = built.controller(named, optimizer, STEPS)
    compiled = model
    if compile_:
        torch._dynamo.reset()
        counters.clear()
        capacity.fix_capacity(controller, optimizer)
        compiled = torch_compile.compiled_module(model)
    losses, ranks, graphs = [], [], []
    for step in range(1, STEPS + 1):
        x, y = (t.float() for t in data(step))
        with controller.capture(step, batch_size=len(x)):
            optimizer.zero_grad()
            loss = ((model if controller.needs_uncompiled(step) else compiled)(x) - y).square().mean()
            (loss + controller.penalty()).backward()
        controller.after_backward()
        optimizer.step()
        controller.step()
        losses.append(loss.item())
        ranks.append(controller.b if method == "dylora" else controller.ranks())
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, ranks, graphs, getattr(controller, "log", [])


@pytest.mark.parametrize("method", method_table.METHODS)
def test_compiled_training_gives_the_eager_losses_and_changing_ranks_never_recompile(method):
    losses, ranks, _, _ = run_steps(method, compile_=False)
    losses_c, ranks_c, graphs, _ = run_steps(method, compile_=True)
    assert losses_c == pytest.approx(losses, rel=1e-5)
    assert ranks_c == ranks
    assert (ranks[-1] != ranks[0]) == (method not in ("lora", "dylora"))  # grown, truncated, grown and shrunk
    assert (len({str(r) for r in ranks}) > 1) == (method != "lora")  # DyLoRA: several b
    # compiled at step 1, never again; SeLoRA's test steps add one graph at step 6 (the next test)
    assert graphs == ([1] * 5 + [2] * (STEPS - 5) if method == "selora" else [1] * STEPS)

class Checkpointed(Block):
    def forward(self, x):
        return checkpoint(super().forward, x, use_reentrant=False)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_selora_test_steps_compile_once_and_give_the_eager_tests(checkpointed):
    """SeLoRA tested every 3 steps until its layers reach rank 8: the first test step (3) runs uncompiled, the next
    (6) compiles one more graph, which the five test steps after it reuse, with no graph break, also under gradient
    checkpointing; their Fisher scores, ratios and decisions are the eager run's."""
    _, ranks, _, tests = run_steps("selora", compile_=False, checkpointed=checkpointed)
    _, ranks_c, graphs, tests_c = run_steps("selora", compile_=True, checkpointed=checkpointed)
    assert graphs == [1] * 5 + [2] * (STEPS - 5) and not counters["graph_break"]
    assert sorted({t.step for t in tests_c}) == [3, 6, 9, 12, 15, 18, 21] and ranks_c == ranks
    assert [(t.step, t.layer, t.rank, t.expanded) for t in tests_c] == [(t.step, t.layer, t.rank, t.expanded)
                                                                        for t in tests]
    for t, t_c in zip(tests, tests_c):
        assert (t_c.score, t_c.ratio) == pytest.approx((t.score, t.ratio), rel=1e-5), (t.step, t.layer)


def small_sd15(seed: int = 0) -> SD15:
    tokenizer = byte_tokenizer()
    text = dataclasses.replace(CLIPTextConfig.tiny(), vocab_size=len(tokenizer.encoder), eos_token_id=tokenizer.end_id,
                               num_hidden_layers=1)
    unet = UNetConfig(model_channels=16, channel_mult=(1,), attention_levels=(True,), num_res_blocks=1, num_heads=2,
                      context_dim=text.hidden_size, norm_groups=8)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = UNet(unet).eval(), CLIPTextModel(text).eval(), VAE(VAEConfig.tiny()).eval()
    return SD15(*parts[:2], tokenizer, parts[2], name=f"small random SD 1.5 (seed {seed})")


def log_lines(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_compile_end_to_end_and_across_resumes(tmp_path, monkeypatch, capsys):
    """SeLoRA, tested every 4 steps (step 4, the run's first test step, uncompiled inside the compiled run): compiled
    for steps 1-5, resumed from its step-4 checkpoint without --compile to step 8, then with --compile to the end,
    gives the eager run's losses, ranks and adapters; a run without --max-rank cannot be resumed compiled."""
    monkeypatch.setattr(train, "load_model", lambda model, tokenizer=None, seed=0: small_sd15(seed))
    common = ["--size", "16", "--batch", "7", "--epochs", "1", "--samples", "0", "--t", "4"]  # 77 images, 11 steps
    eager, part = tmp_path / "eager", tmp_path / "part"
    assert train.main(["--out", str(eager), *common]) == 0
    torch._dynamo.reset()
    counters.clear()
    assert train.main(["--out", str(part), *common, "--compile", "--stop-after", "5", "--checkpoint-every", "4"]) == 0
    # the UNet's and the text encoder's: step 4, the run's first test step, ran uncompiled (a compiled test step would
    # add one graph per model: test_compiled_training_gives_the_eager_losses_and_changing_ranks_never_recompile)
    assert counters["stats"]["unique_graphs"] == 2
    options = json.loads((part / "config.json").read_text())["options"]
    assert options["compile"] is True and options["max_rank"] == 16
    assert train.main(["--resume", str(part), "--no-compile", "--stop-after", "8"]) == 0
    assert counters["stats"]["unique_graphs"] == 2
    assert train.main(["--resume", str(part), "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] == 2  # the resumed run's new model, of the same shapes, reuses them
    a, b = log_lines(eager), log_lines(part)
    assert [line["step"] for line in a] == [line["step"] for line in b] and any("events" in line for line in a)
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "total_rank", "trainable"):
            assert (key in x) == (key in y)
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    saved, saved_c = (weights.load_file(run / "last.safetensors") for run in (eager, part))
    assert saved_c.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(saved_c[key], saved[key], rtol=1e-4, atol=1e-6, msg=key)
    capsys.readouterr()
    assert train.main(["--resume", str(eager), "--compile"]) == 2
    assert "started without --max-rank, so its ranks have no limit" in capsys.readouterr().err


def test_compile_without_a_cpp_compiler_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    assert train.main(["--out", str(tmp_path / "run"), "--compile", "--device", "cpu"]) == 2
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (["--compile", "--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead replays each step as CUDA "
                                                         "graphs, which need a CUDA device, and this run is on cpu"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead goes with --compile"),
])
def test_cuda_graphs_off_a_cuda_device_or_without_compile_are_refused_before_anything_starts(tmp_path, capsys, options,
                                                                                            message):
    assert train.main(["--out", str(tmp_path / "run"), "--device", "cpu", *options]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "run").exists()
