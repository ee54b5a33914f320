"""SeLoRA (selora.py), its literal and its fast test step (fast/fisher.py), on small torch models.

Two models: a 2-layer MLP on [b, d] inputs, and a tiny attention block on [b, N, d] tokens whose
feed-forward pair is applied twice (a layer called twice in one forward).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import selora
from fast import capacity
from fast.fisher import FastSeLoRA
from methods.adapters import draw_candidate, inject
from selora import SeLoRA, SeLoRALinear, expand, literal_fi_ratios, literal_fisher_scores


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra threads only add synchronisation, which costs seconds per test when
    other processes load the machine (measured: 28 s with 2 threads, 0.13 s with 1, for `train` below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self, d=6, h=9, o=4):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, o)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


class Block(nn.Module):
    def __init__(self, d=8, h=12):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        x = x + self.to_out(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v)
        for _ in range(2):  # weight-tied feed-forward: ff1 and ff2 are called twice per forward
            x = x + self.ff2(F.gelu(self.ff1(x)))
        return x


def per_sample_mse(model, x, y):
    return (model(x) - y).square().flatten(1).mean(1)


def make(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = (MLP() if kind == "mlp" else Block()).to(dtype)
    return model, inject(model, SeLoRALinear)


def batch(kind, b, n=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 6) if kind == "mlp" else (b, n, 8)
    out = (b, 4) if kind == "mlp" else (b, n, 8)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(out, generator=g, dtype=dtype)


def randomise(adapters_, seed=2, grow=(0, 1, 2)):
    """Give every adapter a trained-looking state: some ranks added and B non-zero."""
    g = torch.Generator().manual_seed(seed)
    for i, a in enumerate(adapters_.values()):
        for _ in range(grow[i % len(grow)]):
            expand(a, torch.randn(a.base.in_features, generator=g))
        with torch.no_grad():
            a.B.copy_(0.3 * torch.randn(a.B.shape, generator=g))


# ---------------------------------------------------------------- the layer and eq. 2

def test_starts_as_the_base_layer_at_rank_one():
    base = nn.Linear(20, 7)
    layer = SeLoRALinear(base)
    x = torch.randn(3, 20)
    assert layer.rank == 1 and layer.A.shape == (20, 1) and layer.B.shape == (1, 7)
    assert torch.equal(layer.B, torch.zeros(1, 7)) and torch.equal(layer(x), base(x))
    bound = math.sqrt(6 / 20)  # Kaiming-uniform, fan_in = d_in, gain sqrt(2)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
    assert not any(p.requires_grad for p in base.parameters())
    assert float(layer.scale) == 8.0


@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_expansion_keeps_the_output_bit_for_bit(kind):
    model, ads = make(kind, dtype=torch.float32)
    randomise(ads)
    x, _ = batch(kind, 3, dtype=torch.float32)
    with torch.no_grad():
        for r in range(12):  # crosses the 8-rank block boundary of SeLoRALinear.low_rank
            before = model(x)
            for name, a in ads.items():
                expand(a, draw_candidate(a.base.in_features, 0, r, name))
            assert torch.equal(model(x), before), f"output changed at expansion {r}"
            for a in ads.values():
                a.B.normal_()  # train between expansions


def test_expansion_at_a_fixed_capacity_writes_K_into_a_free_column_and_keeps_the_output_bit_for_bit():
    """fast.capacity.fix_capacity (train.py --compile): A and B keep their shapes, K fills A's next column, B's row
    stays zero, Adam's moments of the new entries are zero, and the output does not change at all."""
    model, ads = make("block", dtype=torch.float32)
    randomise(ads)
    optimizer = torch.optim.Adam([p for a in ads.values() for p in (a.A, a.B)], lr=0.1)
    control = SeLoRA(ads, optimizer, max_rank=11)
    capacity.fix_capacity(control, optimizer)
    x, y = batch("block", 3, dtype=torch.float32)
    (model(x) - y).square().mean().backward()
    optimizer.step()
    for r in range(10):  # from ranks 1-3 up to 11: fills and crosses the 8-rank block of SeLoRALinear.low_rank
        with torch.no_grad():
            before = model(x)
        for name, a in ads.items():
            if a.rank < a.capacity:
                K = draw_candidate(a.base.in_features, 0, r, name)
                rank, A, moments = a.rank, a.A.detach().clone(), optimizer.state[a.B]["exp_avg"].clone()
                expand(a, K, optimizer)
                assert a.A.shape == (a.base.in_features, 11) and a.B.shape == (11, a.base.out_features)
                assert torch.equal(a.A[:, rank], K[:, 0]) and torch.equal(a.A[:, :rank], A[:, :rank])
                assert not a.A[:, rank + 1:].any() and not a.B[rank:].any()
                assert torch.equal(optimizer.state[a.B]["exp_avg"], moments) and not moments[rank:].any()
        with torch.no_grad():
            assert torch.equal(model(x), before), f"output changed at expansion {r}"
    assert all(a.rank == 11 and a.factors()[0].shape[1] == 11 for a in ads.values())


def test_expand_is_eq_2():
    layer = SeLoRALinear(nn.Linear(5, 3))
    with torch.no_grad():
        layer.B.normal_()
    A, B, K = layer.A.detach().clone(), layer.B.detach().clone(), torch.randn(5, 1)
    expand(layer, K)
    assert layer.rank == 2
    assert torch.equal(layer.A, torch.cat([A, K], 1)) and torch.equal(layer.B, torch.cat([B, torch.zeros(1, 3)], 0))
    with pytest.raises(ValueError, match="d_in = 5"):
        expand(layer, torch.randn(4))


# ---------------------------------------------------------------- Fisher, FI-score, FI-ratio

def training_tests(model, ads, x, y, step, fisher="sample", lam=1e9, controller=SeLoRA):
    """The training loop's test step: capture during the step's own backward, the FI-scores after it, then the
    test (lam huge: no growth)."""
    control = controller(ads, lam=lam, t=step, fisher=fisher, seed=3)
    with control.capture(step, batch_size=x.shape[0]):
        model.zero_grad()
        per_sample_mse(model, x, y).mean().backward()
    control.after_backward()
    control.step()
    return {t.layer: t for t in control.log}


@pytest.mark.parametrize("controller", [SeLoRA, FastSeLoRA])
@pytest.mark.parametrize("fisher", ["sample", "batch"])
@pytest.mark.parametrize("kind, b, n", [("mlp", 1, 1), ("mlp", 4, 1), ("mlp", 7, 1),
                                        ("block", 1, 3), ("block", 3, 1), ("block", 3, 6), ("block", 5, 4)])
def test_the_training_steps_fisher_equals_the_fisher_by_definition(kind, b, n, fisher, controller):
    """Both test steps, the literal one (selora.SeLoRA) and the fast one (fast.fisher.FastSeLoRA), against one
    backward per sample on an expanded copy of the model (literal_fi_ratios)."""
    model, ads = make(kind)
    randomise(ads)
    x, y = batch(kind, b, n)
    tests = training_tests(model, ads, x, y, step=40, fisher=fisher, controller=controller)
    losses = lambda m: per_sample_mse(m, x, y)
    scores = literal_fisher_scores(model, ads, losses, fisher)
    candidates = {name: draw_candidate(a.base.in_features, 3, 40, name) for name, a in ads.items()}
    ratios = literal_fi_ratios(model, ads, losses, candidates, fisher)
    assert tests.keys() == ads.keys()
    for name in ads:
        attention_of_one_token = n == 1 and name in ("to_q", "to_k")  # softmax over one key: no gradient
        assert (tests[name].score > 0 and ratios[name] > 1) or attention_of_one_token
        assert tests[name].score == pytest.approx(scores[name], rel=1e-6, abs=0), name
        assert tests[name].ratio == pytest.approx(ratios[name], rel=1e-6, abs=0), name


def test_fisher_modes_differ():
    model, ads = make("block")
    randomise(ads)
    x, y = batch("block", 4)
    sample, batch_ = training_tests(model, ads, x, y, 40, "sample"), training_tests(model, ads, x, y, 40, "batch")
    for name in ads:  # mean of squares >= square of mean, strictly for differing samples
        assert sample[name].score > batch_[name].score * 1.01


def test_ratio_by_hand_on_a_two_layer_toy():
    """Scalar layers, d_in = d_out = 1: y1 = (w1 + s a1 b1) x + c1, y2 = (w2 + s a2 b2) y1 + c2,
    l = (y2 - t)^2 per sample; derivatives written out by hand."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)).double()
    ads = inject(model, lambda base: SeLoRALinear(base, scale=2.0))
    w1, c1, w2, c2, s = 0.7, -0.2, 1.3, 0.4, 2.0
    a1, b1, a2, b2 = 0.5, -0.8, -1.1, 0.6
    k1, k2 = (float(draw_candidate(1, 0, 1, n)) for n in "01")  # the candidates SeLoRA(seed=0) tests at step 1
    with torch.no_grad():
        for lin, w, c in ((model[0].base, w1, c1), (model[1].base, w2, c2)):
            lin.weight.fill_(w), lin.bias.fill_(c)
        for a, av, bv in ((ads["0"], a1, b1), (ads["1"], a2, b2)):
            a.A.fill_(av), a.B.fill_(bv)
    xs, ts = [0.3, -1.2, 2.0], [1.0, 0.1, -0.5]
    fisher = {n: [0.0, 0.0] for n in "01"}  # [original, candidate row]
    for x, t in zip(xs, ts):
        y1 = (w1 + s * a1 * b1) * x + c1
        y2 = (w2 + s * a2 * b2) * y1 + c2
        e = 2 * (y2 - t)                      # dl/dy2
        e1 = e * (w2 + s * a2 * b2)           # dl/dy1
        fisher["1"][0] += (e * s * b2 * y1) ** 2 + (e * s * a2 * y1) ** 2  # dl/da2, dl/db2
        fisher["1"][1] += (e * s * k2 * y1) ** 2                           # dl/db2_new
        fisher["0"][0] += (e1 * s * b1 * x) ** 2 + (e1 * s * a1 * x) ** 2
        fisher["0"][1] += (e1 * s * k1 * x) ** 2
    expected = {n: (o + c) / o for n, (o, c) in fisher.items()}
    x, y = torch.tensor(xs, dtype=torch.float64)[:, None], torch.tensor(ts, dtype=torch.float64)[:, None]
    control = SeLoRA(ads, lam=1e9, t=1)
    assert control.rank_cap == {"0": 1, "1": 1}  # 1 x 1 layers are at full rank: a run never tests them ...
    control.rank_cap = {"0": 2, "1": 2}  # ... here they are, so that the scalar sums above check eq. 3-5 by hand
    with control.capture(1, batch_size=3):
        per_sample_mse(model, x, y).mean().backward()
    control.after_backward()
    control.step()
    tests = {t.layer: t for t in control.log}
    for n in "01":
        assert tests[n].score == pytest.approx(fisher[n][0] / 3, rel=1e-12)
        assert tests[n].ratio == pytest.approx(expected[n], rel=1e-12)
    assert selora.fi_ratio(0.0, 0.0) == 1.0 and selora.fi_ratio(0.0, 1.0) == math.inf


def test_batch_size_must_lead_the_input():
    model, ads = make("block")
    x, y = batch("block", 2)
    control = SeLoRA(ads, t=1)
    with pytest.raises(ValueError, match="'to_q'.*batch size 3"):
        with control.capture(1, batch_size=3):
            model(x)


# ---------------------------------------------------------------- the schedule

def train(kind, seed, steps=12, lam=1.5, t=3, opt=torch.optim.Adam):
    model, ads = make(kind, seed=0)
    optimizer = opt([p for a in ads.values() for p in (a.A, a.B)], lr=1e-2)
    control = SeLoRA(ads, optimizer, lam=lam, t=t, seed=seed)
    for step in range(1, steps + 1):
        x, y = batch(kind, 4, seed=100 + step)
        with control.capture(step, batch_size=4):
            optimizer.zero_grad()
            per_sample_mse(model, x, y).mean().backward()
        control.after_backward()
        optimizer.step()
        control.step()
    return model, ads, control


def test_schedule_tests_every_t_steps_and_grows_deterministically():
    _, ads, control = train("block", seed=5)
    assert sorted({t.step for t in control.log}) == [3, 6, 9, 12]
    assert len(control.log) == 4 * len(ads)
    assert any(t.expanded for t in control.log) and not all(t.expanded for t in control.log)
    for t in control.log:
        assert t.expanded == (t.ratio > 1.5)
    for name, a in ads.items():
        assert a.rank == 1 + sum(t.expanded for t in control.log if t.layer == name)
    _, ads2, control2 = train("block", seed=5)
    assert control2.log == control.log
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) for a, b in zip(ads.values(), ads2.values()))
    _, ads3, _ = train("block", seed=6)  # another seed draws other candidates K
    both = [n for n in ads if ads[n].rank > 1 and ads3[n].rank > 1]
    assert both and all(not torch.equal(ads[n].A[:, 1], ads3[n].A[:, 1]) for n in both)


@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW])
def test_grown_layer_trains_on_as_if_the_optimizer_always_held_the_larger_shape(opt):
    """Ours: rank 1, 3 steps, expand with K, 3 more steps. Reference: rank 2 from the start, gradients of
    the would-be entries masked to zero until step 3 (so their moments stay zero), then K written in.
    Both must hold the same parameters and optimizer state after every step."""
    torch.manual_seed(0)
    ours = MLP().double()
    ours_ads = inject(ours, SeLoRALinear)
    ref = MLP().double()
    ref.load_state_dict({k.replace(".base", ""): v for k, v in ours.state_dict().items()
                         if ".base." in k})
    ref_ads = inject(ref, SeLoRALinear)
    K = torch.randn(6, 1, dtype=torch.float64)
    with torch.no_grad():
        for o, r in zip(ours_ads.values(), ref_ads.values()):
            r.A.copy_(o.A)
        expand(ref_ads["l1"], torch.full((6, 1), 0.25))  # placeholder column, overwritten by K at step 3
    masks = {ref_ads["l1"].A: torch.tensor([1.0, 0.0]).double(), ref_ads["l1"].B: torch.tensor([[1.0], [0.0]]).double()}
    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in masks.items()]
    params = lambda ads: [p for a in ads.values() for p in (a.A, a.B)]
    kw = {"lr": 0.05, "weight_decay": 0.1} if opt is torch.optim.AdamW else {"lr": 0.05}
    o_opt, r_opt = opt(params(ours_ads), **kw), opt(params(ref_ads), **kw)
    for step in range(1, 7):
        x, y = batch("mlp", 5, seed=step)
        for model, optimizer in ((ours, o_opt), (ref, r_opt)):
            optimizer.zero_grad()
            per_sample_mse(model, x, y).mean().backward()
            optimizer.step()
        if step == 3:
            expand(ours_ads["l1"], K, o_opt)
            for h in handles:
                h.remove()
            with torch.no_grad():
                ref_ads["l1"].A[:, 1:] = K
        for p, q in zip(params(ours_ads), params(ref_ads)):
            block = tuple(slice(0, n) for n in p.shape)  # before the expansion ours is the leading block
            assert torch.equal(p, q[block]), f"step {step}"
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(o_opt.state[p][key], r_opt.state[q][key][block]), f"step {step}: {key}"
            assert o_opt.state[p]["step"] == r_opt.state[q]["step"] == step
    assert len(o_opt.param_groups) == 1 and set(o_opt.state) == set(params(ours_ads))
    assert o_opt.param_groups[0]["lr"] == 0.05 and ours_ads["l1"].rank == 2


def test_configuration_errors():
    _, ads = make("mlp")
    with pytest.raises(ValueError, match="lam = 0.9 < 1.*insist=True"):
        SeLoRA(ads, lam=0.9)
    with pytest.warns(UserWarning, match="every layer would expand"):
        SeLoRA(ads, lam=0.9, insist=True)
    for t in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="t must be an integer >= 1"):
            SeLoRA(ads, t=t)
    with pytest.raises(ValueError, match="finite"):
        SeLoRA(ads, lam=float("nan"))
    with pytest.raises(ValueError, match="fisher must be one of"):
        SeLoRA(ads, fisher="exact")
    with pytest.raises(ValueError, match="does not hold A and B"):
        SeLoRA(ads, torch.optim.Adam([ads["l1"].A]))
    default = SeLoRA(ads)
    assert (default.lam, default.t, default.fisher) == (1.1, 40, "sample")


@pytest.mark.full
def test_authors_name_filter_on_the_sd15_unet():
    """docs/paper-vs-code.md point 7, on diffusers' SD 1.5 UNet (built on the meta device: no memory)."""
    import diffusers  # test-only oracle

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    linears = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    listed = ["to_q", "to_k", "to_v", "proj", "proj_in", "proj_out", "conv", "conv1", "conv2",
              "conv_shortcut", "to_out.0", "time_emb_proj", "ff.net.2"]  # the script's UNET_TARGET_MODULES
    theirs = [n for n in linears if n.split(".")[-1] in listed]  # their test compares the last component
    assert len(linears) == 184 and len(theirs) == 134
    assert not any(n.endswith(("to_out.0", "ff.net.2")) for n in theirs)
    assert all(type(m) is nn.Conv2d for n, m in unet.named_modules() if n.endswith(("proj_in", "proj_out")))
    ours = inject(unet, SeLoRALinear, ["to_q", "to_k", "to_v", "ff.net.0.proj", "time_emb_proj"])
    assert list(ours) == theirs


def test_candidate_K_does_not_depend_on_the_default_dtype():
    expected = draw_candidate(64, seed=3, step=40, name="unet.x")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        drawn = draw_candidate(64, seed=3, step=40, name="unet.x")
    finally:
        torch.set_default_dtype(old)
    assert drawn.dtype == torch.float32 and torch.equal(drawn, expected)


def test_later_test_steps_probe_as_the_first_does_and_gradient_checkpointing_counts_each_call_once():
    """The fast test step: the first test step's probes make their zeros in the forward; later ones get them made
    before it, in the shapes the first saw (what a compiled test step needs). Both give the same Fisher scores and
    ratios, bit for bit, and so does a forward under gradient checkpointing, whose backward calls every layer
    again. The literal test step's hooks too count each call once under checkpointing."""
    model, ads = make("block")
    randomise(ads)
    x, y = batch("block", 3)
    for controller in (FastSeLoRA, SeLoRA):
        control = controller(ads, lam=1e9, t=40, seed=3)
        logs = []
        for forward in (model, model, lambda x: checkpoint(model, x, use_reentrant=False)):
            assert control.needs_uncompiled(40) == (controller is FastSeLoRA and not logs)
            with control.capture(40, batch_size=3):
                model.zero_grad()
                (forward(x) - y).square().flatten(1).mean(1).mean().backward()
            control.after_backward()
            logs.append(control.step())
        assert len(logs[0]) == len(ads) and logs[1] == logs[0] and logs[2] == logs[0]
