"""docs/tour.md's section 10 lists, in order, the functions one SeLoRA test step calls, with file and line: the
list must be what a traced step on the tiny model calls (sys.settrace), so the path a reader is told is the path
the code takes.

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

import adapters  # noqa: E402
import diffusion  # noqa: E402
import methods  # noqa: E402
from sd15 import tiny_sd15  # noqa: E402

TOUR = ROOT / "docs" / "tour.md"
MODULES = ("diffusion", "distributed", "selora", "probe", "adapters")  # the training step's and SeLoRA's own code
ACCESSORS = {"distributed.world_size", "distributed.rank", "adapters.Adapter.rank"}  # one-line lookups, left out
ENTRY = re.compile(r"^\d+\. `([\w.]+)` \((\w+\.py):(\d+)\)", re.M)


def traced_step() -> list[tuple[str, str, int]]:
    """(module.function, file, line of its def) of every function of MODULES one SeLoRA test step calls, in the
    order of their first call: diffusion.train_step, optimizer.step(), controller.step(), as train.py's loop.
    Comprehensions, lambdas and ACCESSORS are left out; closures are named after the function that makes them."""
    torch.manual_seed(0)
    sd = tiny_sd15(0)
    method = methods.build("selora", t=1)  # step 1 is a test step
    named = adapters.inject(sd.adaptable(), method.make_adapter)
    params = [p for a in named.values() for p in a.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    controller = method.controller(named, optimizer)
    batch = (torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 4, 4, 4),
             sd.tokenizer.encode(["left", "right"])[0])
    seen = []

    def tracer(frame, event, arg):
        code = frame.f_code
        module = frame.f_globals.get("__name__")
        if (event == "call" and module in MODULES and not code.co_name.startswith("<")
                and Path(code.co_filename).parent == ROOT):  # not dataclasses' generated __init__
            name = f"{module}.{code.co_qualname.replace('.<locals>', '')}"
            entry = (name, Path(code.co_filename).name, code.co_firstlineno)
            if name not in ACCESSORS and entry not in seen:
                seen.append(entry)

    sys.settrace(tracer)
    try:
        diffusion.train_step(sd, batch, 1, controller, optimizer, params, nullcontext())
        optimizer.step()
        events = controller.step()
    finally:
        sys.settrace(None)
    assert any(e["expanded"] for e in events)  # the step grows a layer, so expand's path is on the list
    return seen


def test_the_tours_step_path_is_the_traced_one():
    listed = [(name, file, int(line)) for name, file, line in ENTRY.findall(TOUR.read_text())]
    assert listed, f"{TOUR}: no numbered function list"
    assert listed == traced_step()


if __name__ == "__main__":
    for i, (name, file, line) in enumerate(traced_step(), 1):
        print(f"{i}. `{name}` ({file}:{line})")
