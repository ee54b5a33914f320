"""A torchrun entry point for tests/test_distributed.py: train.py, except that the process of rank RANK
kills itself with SIGKILL (as the out-of-memory killer would) when it starts training step STEP.

    torchrun --nproc_per_node 2 tests/ddp_fault.py RANK STEP train.py-options...
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import diffusion  # noqa: E402
import train  # noqa: E402

kill_rank, kill_step = int(sys.argv[1]), int(sys.argv[2])
real_step = diffusion.train_step


def dying_step(sd, batch, step, *rest):
    if step == kill_step and int(os.environ["RANK"]) == kill_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(sd, batch, step, *rest)


diffusion.train_step = dying_step
sys.exit(train.main(sys.argv[3:]))
