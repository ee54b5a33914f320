"""docs/tour.md's section 10 lists, in order, the functions one SeLoRA test step calls, with file and line: the
list must be what a traced step on the tiny model calls (sys.settrace), so the path a reader is told is the path
the code takes. And a test step stays readable: beyond what a plain step calls, it calls at most 10 project
functions, in at most 3 files (issue 32; the test step before it added 26 in 4 files).

After a change of that path, print the traced list and rewrite the section from it:

    .venv-test/bin/python tests/test_step_path.py
"""
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from methods import adapters  # noqa: E402
from model.sd15 import tiny_sd15  # noqa: E402
from training import diffusion, method_table  # noqa: E402

TOUR = ROOT / "docs" / "tour.md"
ACCESSORS = {"fast.distributed.world_size", "fast.distributed.rank", "methods.adapters.Adapter.rank",
             "selora.SeLoRALinear.factors", "model.sd15.SD15.device"}  # one-line lookups
MODEL = ("sd_unet.", "clip_text.", "vae.")  # the networks' own forwards: in every step, not in the tour's list
ENTRY = re.compile(r"^\d+\. `([\w.]+)` \(([\w/]+\.py):(\d+)\)", re.M)


def traced_steps(t: int = 1) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(module.function, file, line of its def) of every project function that one SeLoRA step calls, in the order
    of their first call, for step 1 and step 2 of a run with test interval t, as train.py's loop takes a step:
    diffusion.train_step, optimizer.step(), controller.step(). Comprehensions, lambdas, generated code (a
    dataclass's __init__) and ACCESSORS are left out; closures are named after the function that makes them;
    tests/, the standard library and torch are not the project's."""
    torch.manual_seed(0)
    sd = tiny_sd15(0)
    method = method_table.build("selora", t=t)
    named = adapters.inject(sd.adaptable(), method.make_adapter)
    params = [p for a in named.values() for p in a.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    controller = method.controller(named, optimizer)
    batch = (torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 4, 4, 4),
             sd.tokenizer.encode(["left", "right"])[0])
    paths = []
    for step in (1, 2):
        seen = []

        def tracer(frame, event, arg):
            code = frame.f_code
            path = Path(code.co_filename)
            if (event == "call" and not code.co_name.startswith("<") and path.is_absolute()
                    and path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] not in ("tests", ".venv", ".venv-test")):
                name = f"{frame.f_globals.get('__name__')}.{code.co_qualname.replace('.<locals>', '')}"
                entry = (name, path.relative_to(ROOT).as_posix(), code.co_firstlineno)
                if name not in ACCESSORS and entry not in seen:
                    seen.append(entry)

        sys.settrace(tracer)
        try:
            diffusion.train_step(sd, batch, step, controller, optimizer, params, nullcontext())
            optimizer.step()
            events = controller.step()
        finally:
            sys.settrace(None)
        assert any(e.get("expanded") for e in events) == controller.is_test_step(step)  # a test step grows a layer
        paths.append(seen)
    return paths[0], paths[1]


def test_the_tours_step_path_is_the_traced_one():
    listed = [(name, file, int(line)) for name, file, line in ENTRY.findall(TOUR.read_text())]
    assert listed, f"{TOUR}: no numbered function list"
    assert listed == [entry for entry in traced_steps(t=1)[0] if not entry[0].startswith(MODEL)]


def test_a_test_step_adds_at_most_10_project_functions_in_3_files_to_a_plain_step():
    plain, test = traced_steps(t=2)  # step 1 plain, step 2 a test step
    added = [entry for entry in test if entry[:2] not in {e[:2] for e in plain}]
    files = {file for _, file, _ in added}
    assert len(added) <= 10 and len(files) <= 3, added
    assert {"selora.per_sample_grads", "selora.fisher_score", "selora.fi_ratio", "selora.expand"} <= {
        name for name, _, _ in added}  # eq. 3-4, 5 and 2 are on the path, called by training


if __name__ == "__main__":
    for i, (name, file, line) in enumerate([e for e in traced_steps(t=1)[0] if not e[0].startswith(MODEL)], 1):
        print(f"{i}. `{name}` ({file}:{line})")
    plain, test = traced_steps(t=2)
    added = [entry for entry in test if entry[:2] not in {e[:2] for e in plain}]
    print(f"\na test step adds {len(added)} functions in {len({f for _, f, _ in added})} files:")
    for name, file, line in added:
        print(f"   `{name}` ({file}:{line})")
