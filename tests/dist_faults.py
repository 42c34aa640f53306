"""`torchrun ... tests/dist_faults.py {die,hang} RANK run.py-args...`: run.py, with one rank made to fail inside the
training loop at its second optimizer step: `die` raises, `hang` never reaches the gradient all-reduce."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # noqa: E402
import train.loop  # noqa: E402
from common.launch import process_rank  # noqa: E402

mode, faulty_rank, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_step = train.loop.optimizer_step
calls = 0


def faulty_step(*args, **kwargs):
    global calls
    calls += 1
    if process_rank() == faulty_rank and calls == 2:
        if mode == "die":
            raise RuntimeError("injected failure")
        time.sleep(3600)
    return real_step(*args, **kwargs)


train.loop.optimizer_step = faulty_step
sys.exit(run.main(argv))
