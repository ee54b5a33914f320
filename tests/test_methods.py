"""The method table (training/method_table.py): every method behind one interface trains, saves, loads, merges, reports
its ranks in one format and resumes exactly from its saved state."""
import json

import pytest
import torch
from torch import nn

from fast.capacity import fix_capacity
from fast.capacity import in_use
from methods.adapters import Adapter, inject, load_adapters, merge, save_adapters
from methods.baselines import AdaLoRA, AdaLoRALinear, DyLoRALinear, LoRALinear
from methods.lora2 import LoRA2, LoRA2Linear
from model import weights
from training.checkpoint import load_checkpoint, optimizer_tensors, save_checkpoint
from training.method_table import METHODS, adapter_for_file, build
from selora import SeLoRA, SeLoRALinear
from test_selora import Block, _one_thread  # noqa: F401  (the SeLoRA tests' small model, and their one-thread fixture)


# options that make every method change something within a few steps of a tiny run
ACTIVE = {
    "lora": {},
    "selora": {"lam": 1.0, "t": 2, "insist": True},
    "dylora": {"mode": "frozen"},
    "adalora": {"target_r": 2, "tinit": 1, "tfinal": 3, "delta_t": 2},
    "lora2": {"n_obs": 0.05, "max_rank": 6},
}
TOTAL = 12


def data(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(3, 5, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, 8, generator=g, dtype=torch.float64)


def setup(name, seed=0, **options):
    torch.manual_seed(seed)
    model = Block().double()
    method = build(name, **ACTIVE[name], **options)
    ads = inject(model, method.make_adapter)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, ads, opt, method.controller(ads, opt, TOTAL)


def train(model, opt, control, steps):
    """The training loop every method shares; it keeps the previous loss alive across steps, as loops do."""
    events, loss = [], None
    for step in steps:
        x, y = data(step)
        with control.capture(step, batch_size=3):
            loss = (model(x) - y).square().mean() + control.penalty()
            opt.zero_grad()
            loss.backward()
        control.after_backward()
        opt.step()
        events += control.step()
    return events


def test_the_table_and_the_paper_defaults():
    assert METHODS == ("lora", "selora", "dylora", "adalora", "lora2")
    base = nn.Linear(8, 8)
    adapters_ = {name: build(name).make_adapter(base) for name in METHODS}
    assert [type(a) for a in adapters_.values()] == [LoRALinear, SeLoRALinear, DyLoRALinear, AdaLoRALinear, LoRA2Linear]
    assert [a.method for a in adapters_.values()] == list(METHODS)
    assert adapters_["lora"].rank == 4 and adapters_["dylora"].rank == 4 and adapters_["adalora"].rank == 6
    assert adapters_["selora"].rank == 1
    model = Block()
    ada = build("adalora").controller(inject(model, build("adalora").make_adapter), None, 100)
    assert (ada.init_r, ada.target_r) == (6, 4)
    sel = build("selora").controller(inject(Block(), SeLoRALinear), None, 100)
    assert isinstance(sel, SeLoRA) and (sel.lam, sel.t) == (1.1, 40)


def test_options_go_to_the_adapter_or_the_controller_by_name():
    method = build("lora2", k=0.5, rank=3, max_rank=5)
    layer = method.make_adapter(nn.Linear(8, 8))
    control = method.controller({"x": layer}, None, 10)
    assert layer.rank == 3 and control.k == 0.5 and control.max_rank == 5
    assert build("lora", r=2, alpha=4.0).make_adapter(nn.Linear(8, 8)).scale == 2.0
    with pytest.raises(ValueError, match="method 'lora' takes no option lam; adapter options: alpha, r"):
        build("lora", lam=1.1)
    with pytest.raises(ValueError, match="unknown method 'qlora', expected one of lora, selora"):
        build("qlora")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_saves_loads_and_merges_alike(name, tmp_path):
    model, ads, opt, control = setup(name)
    initial = control.ranks()
    events = train(model, opt, control, range(1, TOTAL + 1))
    assert all({"step", "layer", "rank"} <= set(e) for e in events)
    assert all(isinstance(e["step"], int) and e["layer"] in ads and isinstance(e["rank"], int) for e in events)
    ranks = control.ranks()
    assert list(ranks) == list(ads) and all(isinstance(r, int) and r >= 0 for r in ranks.values())
    assert (ranks != initial) == (name in ("selora", "adalora", "lora2"))  # the adaptive ones adapted
    assert ranks == {n: a.rank for n, a in ads.items()}  # after the run, stored shapes are the ranks

    path = tmp_path / f"{name}.safetensors"
    save_adapters(ads, path, {**control.metadata(), "base_model": "tiny-block"})
    x, _ = data(99)
    fresh = Block().double()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".base." in k})
    loaded, meta = load_adapters(fresh, path, adapter_for_file(path))
    assert meta["method"] == name and meta["step"] == str(TOTAL) and meta["base_model"] == "tiny-block"
    if name == "adalora":
        assert json.loads(meta["kept_ranks"]) == ranks
    assert {n: a.rank for n, a in loaded.items()} == ranks
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
        for layer, adapter in loaded.items():
            parent, _, attr = layer.rpartition(".")
            setattr(fresh.get_submodule(parent), attr, merge(adapter))
        assert not any(isinstance(m, Adapter) for m in fresh.modules())
        torch.testing.assert_close(fresh(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", METHODS)
def test_resume_from_saved_state_continues_identically(name, tmp_path):
    model, ads, opt, control = setup(name)
    train(model, opt, control, range(1, TOTAL + 1))
    straight = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, ads, opt, control = setup(name)
    train(model, opt, control, range(1, 6))
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    save_adapters(ads, tmp_path / "a.safetensors", control.metadata())
    save_checkpoint(tmp_path / "c.safetensors", opt, names, {}, {"step": 5}, extra=control.state())
    if name == "adalora":
        assert control.state() and any(k.startswith("ema.") for k in control.state())

    torch.manual_seed(123)  # a resumed process does not share the first one's random state
    fresh = Block().double()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".base." in k})
    method = build(name, **ACTIVE[name])
    loaded, _ = load_adapters(fresh, tmp_path / "a.safetensors", method.make_adapter)
    opt2 = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=0.05)
    counters, state = load_checkpoint(tmp_path / "c.safetensors", opt2, {p: n for n, p in fresh.named_parameters()
                                                                         if p.requires_grad}, {})
    control2 = method.controller(loaded, opt2, TOTAL)
    control2.load_state(state)
    train(fresh, opt2, control2, range(counters["step"] + 1, TOTAL + 1))
    resumed = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert resumed.keys() == straight.keys()
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n


CAPACITY = {"selora": {"max_rank": 3}}  # SeLoRA sets no maximum rank by default; here layers reach it


@pytest.mark.parametrize("name", METHODS)
def test_a_fixed_capacity_trains_saves_and_checkpoints_as_the_true_ranks_do(name, tmp_path):
    """fast.capacity.fix_capacity (train.py --compile): the factors keep one shape from the start, the ranks change in
    place, and the run is the one without: the same outputs and events, and saved files and optimizer state
    at the true ranks."""
    runs = []
    for fixed in (False, True):
        model, ads, opt, control = setup(name, **CAPACITY.get(name, {}))
        initial = control.ranks()
        if fixed:
            fix_capacity(control, opt)
            factors = {n: (p, p.shape) for n, p in model.named_parameters() if p.requires_grad}
        events = train(model, opt, control, range(1, TOTAL + 1))
        save_adapters(ads, tmp_path / f"{fixed}.safetensors", control.metadata())
        names = {p: n for n, p in model.named_parameters() if p.requires_grad}
        state = optimizer_tensors(opt, names, in_use(ads))
        with torch.no_grad():
            runs.append((model(data(99)[0]), events, control.ranks(), state))
    assert all(p is getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) and p.shape == shape
               for n, (p, shape) in factors.items())
    (out, events, ranks, state), (out_f, events_f, ranks_f, state_f) = runs
    assert (ranks != initial) == (name in ("selora", "adalora", "lora2"))  # the adaptive ones adapted
    assert ranks_f == ranks and len(events_f) == len(events)
    for e, e_f in zip(events, events_f):
        assert e_f.keys() == e.keys()
        assert all(e_f[k] == (pytest.approx(v, rel=1e-10) if isinstance(v, float) else v) for k, v in e.items())
    torch.testing.assert_close(out_f, out, rtol=1e-10, atol=1e-12)
    saved, saved_f = (weights.load_file(tmp_path / f"{fixed}.safetensors") for fixed in (False, True))
    assert saved_f.keys() == saved.keys() and state_f.keys() == state.keys()
    for tensors, tensors_f in ((saved, saved_f), (state, state_f)):
        for k in tensors:
            torch.testing.assert_close(tensors_f[k], tensors[k], rtol=1e-10, atol=1e-12, msg=k)
    if name == "selora":  # tests every 2 steps: each layer grew to max_rank 3 by step 4, logged once, then untested
        assert set(ranks.values()) == {3} and {e["step"] for e in events} == {2, 4}
        assert sorted(e["layer"] for e in events if e.get("reached_max_rank")) == sorted(ads)


@pytest.mark.parametrize("fixed", [False, True], ids=["true ranks", "fixed capacity"])
@pytest.mark.parametrize("name", METHODS)
def test_add_penalty_gradient_adds_what_backward_of_the_penalty_would(name, fixed):
    """controller.add_penalty_gradient() after loss.backward() (train.py's step) leaves every gradient as
    (loss + penalty()).backward() does: AdaLoRA's regulariser and LoRA^2's prior in closed form, after 10 steps of
    training (AdaLoRA masked and truncated, LoRA^2 resized), at the true ranks and at a fixed capacity."""
    model, ads, opt, control = setup(name, **CAPACITY.get(name, {}))
    if fixed:
        fix_capacity(control, opt)
    train(model, opt, control, range(1, 11))
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data(11)
    grads = []
    for closed_form in (False, True):
        with control.capture(11, batch_size=3):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            if closed_form:
                loss.backward()
                control.add_penalty_gradient()
            else:
                (loss + control.penalty()).backward()
        grads.append([p.grad.clone() for p in params])
    if name in ("adalora", "lora2"):
        assert float(control.penalty().detach()) > 1e-6  # there is a penalty to differentiate
    for g, g_closed in zip(*grads):
        torch.testing.assert_close(g_closed, g, rtol=1e-10, atol=1e-14)


def test_a_fixed_capacity_needs_a_maximum_rank():
    _, ads, opt, control = setup("selora")
    with pytest.raises(ValueError, match="SeLoRA sets no maximum rank, so layer 'to_q' cannot be stored at a fixed"):
        fix_capacity(control, opt)


def test_adalora_without_its_state_would_not_resume_identically(tmp_path):
    """The EMA importances matter: dropping them changes the masking, so the state test above can fail."""
    model, ads, opt, control = setup("adalora")
    train(model, opt, control, range(1, 6))
    state = control.state()
    fresh_control = AdaLoRA(ads, opt, TOTAL, **{k: v for k, v in ACTIVE["adalora"].items()})
    scores_with = {n: s.clone() for n, s in control.triplet_scores().items()}
    fresh_control.load_state({k: v for k, v in state.items() if k.startswith("kept.")})
    assert any(not torch.equal(fresh_control.triplet_scores()[n], scores_with[n]) for n in ads)
    with pytest.raises(ValueError, match="fits no adapter tensor"):
        fresh_control.load_state({**state, "ema.to_q.A.sensitivity": torch.zeros(2)})


def test_adalora_layer_pruned_to_rank_zero_saves_and_loads(tmp_path):
    model, ads, opt, _ = setup("adalora")
    control = AdaLoRA(ads, opt, TOTAL, target_r=2)
    control.kept = {n: torch.zeros(a.rank, dtype=torch.bool) if n == "to_v" else torch.ones(a.rank, dtype=torch.bool)
                    for n, a in ads.items()}
    control.truncate()
    assert ads["to_v"].rank == 0 and control.ranks()["to_v"] == 0
    path = tmp_path / "zero.safetensors"
    save_adapters(ads, path)
    x, _ = data(0)
    fresh = Block().double()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".base." in k})
    loaded, _ = load_adapters(fresh, path, adapter_for_file(path))
    assert loaded["to_v"].rank == 0
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_adapter_for_file_refuses_files_of_no_known_method(tmp_path):
    path = tmp_path / "x.safetensors"
    weights.save_file({"w": torch.zeros(1)}, path, {"method": "ia3"})
    with pytest.raises(ValueError, match="metadata 'method' is 'ia3', expected one of lora, selora"):
        adapter_for_file(path)


def test_lora2_controller_keeps_no_state_and_refuses_some():
    _, ads, opt, control = setup("lora2")
    assert isinstance(control, LoRA2) and control.state() == {}
    with pytest.raises(ValueError, match="LoRA2 keeps no state"):
        control.load_state({"x": torch.zeros(1)})


@pytest.mark.parametrize("name", METHODS)
def test_half_precision_base_keeps_float32_factors(name):
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    method = build(name, **ACTIVE[name])
    ads = inject(model, method.make_adapter)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    control = method.controller(ads, opt, TOTAL)
    for step in range(1, 5):
        x = data(step)[0].to(torch.bfloat16)
        with control.capture(step, batch_size=3):
            out = model(x)
            loss = out.float().square().mean() + control.penalty()
            opt.zero_grad()
            loss.backward()
        control.after_backward()
        opt.step()
        control.step()
    assert out.dtype == torch.bfloat16 and control.penalty().dtype == torch.float32
    assert all(p.dtype == torch.float32 for a in ads.values() for n, p in a.named_parameters() if not n.startswith("base."))
    assert all(b.dtype == torch.float32 for a in ads.values() for n, b in a.named_buffers() if not n.startswith("base."))
