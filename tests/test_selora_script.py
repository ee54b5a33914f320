"""SeLoRA's expansion test as the authors' script runs it (methods/selora_script.py, train.py --expansion-test script).

Each property the script's code has (docs/paper-vs-code.md, points 3-5 and 8) is checked against an oracle that
does what the script does: a deep copy of the model with the script's temp weights (A and B after the step, the
candidate appended to A, a zero row appended to B), one forward and backward of the batch-mean loss, and the
sum of squared .grad. Then train.py end to end: 2 processes decide as 1, and a resumed run as an uninterrupted one.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fast.fisher import FastScriptSeLoRA
from methods.adapters import draw_candidate, inject
from methods.selora_script import ScriptSeLoRA
from model import weights
from training import method_table
from selora import SeLoRA, SeLoRALinear
import train
from tests.test_distributed import RUN, assert_same_training, one_thread, torchrun  # noqa: F401 (one_thread: autouse)
from tests.test_selora import MLP

B = 8


def setup(lam=1.3, controller=ScriptSeLoRA):
    torch.manual_seed(0)
    model = MLP(d=6, h=9, o=4).double()
    layers = inject(model, SeLoRALinear)
    for layer in layers.values():  # a non-zero B, so that every gradient is non-zero
        layer.B.data.normal_(0, 0.3)
    optimizer = torch.optim.Adam([p for a in layers.values() for p in (a.A, a.B)], lr=1e-2)
    x, y = torch.randn(B, 6, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    rule = controller(layers, optimizer, t=1)
    rule.lam = lam  # any threshold, infinite included, to watch the ratios without growth
    return model, layers, optimizer, rule, x, y


def sum_square(tensors) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


def temp_gradients(model, layers, candidates, x, y) -> dict[str, float]:
    """The script's get_rmse_grad at the temp weights: a copy with A <- [A K], B <- [B; 0] as parameters,
    one backward of the batch-mean loss, the sum of squares of both factors' .grad (script:258-274)."""
    twin = copy.deepcopy(model)
    temp = {}
    for name, layer in layers.items():
        t = twin.get_submodule(name)
        t.A = torch.nn.Parameter(torch.cat([layer.A.detach(), candidates[name].to(layer.A)], 1))
        t.B = torch.nn.Parameter(torch.cat([layer.B.detach(), torch.zeros_like(layer.B[:1])], 0))
        temp[name] = t
    F.mse_loss(twin(x), y).backward()
    return {name: sum_square([t.A.grad, t.B.grad]) for name, t in temp.items()}


def script_step(model, layers, optimizer, rule, x, y, step):
    """One training step as train.py runs it under the script rule; returns (recorded, oracle temp sums, events)."""
    with rule.capture(step, B):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
    rule.after_backward()
    recorded = {name: sum_square([a.A.grad, a.B.grad]) for name, a in layers.items()}  # script:278
    optimizer.step()
    oracle = None
    if rule.second_pass(step):
        oracle = temp_gradients(model, layers, {n: rule.candidate(n) for n in layers}, x, y)
        with rule.capture(step, B):
            F.mse_loss(model(x), y).backward()
        rule.after_backward()
        optimizer.zero_grad()
    return recorded, oracle, rule.step()


@pytest.mark.parametrize("controller", [ScriptSeLoRA, FastScriptSeLoRA])
def test_first_test_ratio_is_the_post_step_over_the_pre_step_squared_gradient_norm(controller):
    model, layers, optimizer, rule, x, y = setup(lam=math.inf, controller=controller)
    for name in layers:
        assert torch.count_nonzero(rule.candidate(name)) == 0  # the temp row is never initialised
    recorded, oracle, events = script_step(model, layers, optimizer, rule, x, y, 1)
    twin = copy.deepcopy(model)  # the same weights, unexpanded: the squared gradient norm after the step
    F.mse_loss(twin(x), y).backward()
    after = {name: sum_square([twin.get_submodule(name).A.grad, twin.get_submodule(name).B.grad]) for name in layers}
    assert {e["layer"] for e in events} == set(layers)
    for e in events:
        assert e["ratio"] == pytest.approx(after[e["layer"]] / recorded[e["layer"]], rel=1e-10)
        assert e["ratio"] == pytest.approx(oracle[e["layer"]] / recorded[e["layer"]], rel=1e-10)
        assert e["score"] == pytest.approx(recorded[e["layer"]], rel=1e-10)  # the batch-mean gradient, squared
        assert not e["expanded"]
    assert any(abs(e["ratio"] - 1) > 1e-3 for e in events)  # the step moved the gradient


def grow_once(lam=0.0, controller=ScriptSeLoRA):
    """A run whose every layer grows at its first test (lambda 0 accepts any ratio), then tests at step 2."""
    model, layers, optimizer, rule, x, y = setup(controller=controller)
    rule.lam = lam
    _, _, first = script_step(model, layers, optimizer, rule, x, y, 1)
    assert all(e["expanded"] for e in first)
    return model, layers, optimizer, rule, x, y


@pytest.mark.parametrize("controller", [ScriptSeLoRA, FastScriptSeLoRA])
def test_a_candidate_appears_only_after_the_first_expansion_and_stays_until_the_next(controller):
    model, layers, optimizer, rule, x, y = grow_once(controller=controller)
    for name, layer in layers.items():
        K = rule.candidate(name)
        bound = math.sqrt(6 / layer.base.in_features)  # Kaiming-uniform, script:319
        assert torch.count_nonzero(K) == K.numel() and K.abs().max() <= bound
        assert torch.equal(K, draw_candidate(layer.base.in_features, 0, 1, name + "/candidate"))  # drawn at step 1
    rule.lam = math.inf
    recorded, oracle, events = script_step(model, layers, optimizer, rule, x, y, 2)
    for e in events:  # the candidate now feeds B's new row: the ratio is the temp copy's, candidate included
        assert e["ratio"] == pytest.approx(oracle[e["layer"]] / recorded[e["layer"]], rel=1e-10)


def test_the_rule_is_greater_or_equal():
    _, layers, optimizer, rule, _, _ = setup(lam=1.3)
    assert rule.exceeds(1.3, rule.lam) and not rule.exceeds(math.nextafter(1.3, 0), rule.lam)
    assert not SeLoRA(layers, optimizer, lam=1.3).exceeds(1.3, 1.3)  # the paper's "exceeds": >
    _, _, events = script_step(*setup(lam=math.inf), 1)
    ratio = events[0]["ratio"]  # the same computation again (setup seeds), with lambda exactly that ratio
    model, layers, optimizer, rule, x, y = setup(lam=ratio)
    _, _, events = script_step(model, layers, optimizer, rule, x, y, 1)
    assert events[0]["ratio"] == ratio and events[0]["expanded"]


def test_a_fresh_row_is_drawn_at_expansion_and_the_adam_state_of_A_and_B_is_reset():
    model, layers, optimizer, rule, x, y = grow_once()
    rule.lam = 0.0
    tested = {name: rule.candidate(name) for name in layers}
    before = {name: (layer.A.detach().clone(), layer.B.detach().clone()) for name, layer in layers.items()}
    with rule.capture(2, B):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
    rule.after_backward()
    optimizer.step()
    after_step = {name: (layer.A.detach().clone(), layer.B.detach().clone()) for name, layer in layers.items()}
    with rule.capture(2, B):
        F.mse_loss(model(x), y).backward()
    rule.after_backward()
    assert all(e["expanded"] for e in rule.step())
    for name, layer in layers.items():
        assert layer.rank == 3 and torch.equal(layer.A[:, :2], after_step[name][0])
        new = layer.A[:, 2:]
        assert not torch.equal(new, tested[name].to(new))  # not the candidate that was tested
        assert torch.equal(new, draw_candidate(layer.base.in_features, 0, 2, name).to(new))
        assert torch.count_nonzero(layer.B[2]) == 0
        assert layer.A not in optimizer.state and layer.B not in optimizer.state  # new param groups (script:323)
        assert not torch.equal(before[name][0], after_step[name][0])
    # the next step starts Adam afresh: step count 1, and its first update is lr * g / (|g| + eps), about lr x sign
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    grads = {name: layer.A.grad.clone() for name, layer in layers.items()}
    start = {name: layer.A.detach().clone() for name, layer in layers.items()}
    optimizer.step()
    for name, layer in layers.items():
        assert float(optimizer.state[layer.A]["step"]) == 1
        g = grads[name]
        torch.testing.assert_close(layer.A.detach() - start[name], -1e-2 * g / (g.abs() + 1e-8), rtol=1e-9, atol=1e-12)


def test_the_paper_rule_is_the_default_and_fisher_sample_is_refused_under_the_script_rule():
    _, layers, optimizer, _, _, _ = setup()
    assert type(method_table.build("selora").controller(layers, optimizer)) is SeLoRA
    script = method_table.build("selora", expansion_test="script").controller(layers, optimizer)
    assert type(script) is ScriptSeLoRA and script.lam == 1.3 and script.t == 40 and script.fisher == "batch"
    with pytest.raises(ValueError, match="script:266-274"):
        method_table.build("selora", expansion_test="script", fisher="sample").controller(layers, optimizer)


SCRIPT = ["--expansion-test", "script", "--lam", "1.0"]  # 1.0: some layers grow, some do not, on the tiny model


def decisions(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e["layer"], e["expanded"]) for line in lines for e in line.get("events", [])]


@pytest.fixture(scope="module")
def single_script(tmp_path_factory):
    out = tmp_path_factory.mktemp("script") / "run"
    assert train.main(["--out", str(out), "--batch", "8", *RUN, *SCRIPT]) == 0
    return out


def test_a_script_run_records_its_rule_and_grows_some_layers(single_script):
    config = json.loads((single_script / "config.json").read_text())["options"]
    assert (config["expansion_test"], config["lam"], config["fisher"]) == ("script", 1.0, "batch")
    meta = weights.load_metadata(single_script / "last.safetensors")
    assert meta["expansion_test"] == "script" and meta["lambda"] == "1.0" and meta["fisher"] == "batch"
    grown = [d for d in decisions(single_script) if d[2]]
    assert grown and len(grown) < len(decisions(single_script))


def test_two_processes_decide_as_one_under_the_script_rule(single_script, tmp_path):
    out = tmp_path / "run"
    result = torchrun("train.py", "--out", str(out), "--batch", "4", *RUN, *SCRIPT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert decisions(out) == decisions(single_script)
    # The script rule resets Adam's state where a layer grows: its first steps move each weight by about lr
    # whatever the gradient's size, so the all-reduced sums' last bits can flip a near-zero gradient's step. The
    # decisions and losses are the same; the adapters within 2 x 12 steps of lr 1e-3.
    assert_same_training(single_script, out, atol=0.024)


def test_a_resumed_script_run_decides_as_an_uninterrupted_one(single_script, tmp_path):
    out = tmp_path / "part"
    assert train.main(["--out", str(out), "--batch", "8", *RUN, *SCRIPT, "--stop-after", "9"]) == 0
    assert train.main(["--resume", str(out)]) == 0  # from the step-8 checkpoint: candidates from the saved state
    assert decisions(out) == decisions(single_script)
    assert_same_training(single_script, out)
