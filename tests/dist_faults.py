"""`torchrun ... tests/dist_faults.py {die,hang,stop} RANK run.py-args...`: run.py, with one rank made to misbehave
at its second optimizer step: `die` raises, `hang` never reaches the gradient all-reduce, `stop` sends itself SIGTERM
(and rank 0's checkpoints take two seconds longer to save, as a large one does)."""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # noqa: E402
import train.loop  # noqa: E402
from common.launch import process_rank  # noqa: E402

mode, faulty_rank, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_step, real_save = train.loop.launch_optimizer_step, train.loop.save_checkpoint
calls = 0


def faulty_step(*args, **kwargs):
    global calls
    calls += 1
    if process_rank() == faulty_rank and calls == 2:
        if mode == "die":
            raise RuntimeError("injected failure")
        if mode == "hang":
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(*args, **kwargs)


def slow_save(*args, **kwargs):
    time.sleep(2)
    return real_save(*args, **kwargs)


train.loop.launch_optimizer_step = faulty_step
if mode == "stop":
    train.loop.save_checkpoint = slow_save
sys.exit(run.main(argv))
