"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption): the first asks the training loop to stop at the next step
boundary and save; a second one, or one that comes while nothing can be saved yet, stops at once."""
import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None  # set by the first signal once `deferred`
        self.deferred = False  # True while the loop can stop cleanly at a step boundary
        self.saved = False  # True once the stop's checkpoint is written: later signals change nothing

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.saved:  # e.g. torchrun ending this rank as the others exit after the same checkpoint
            return
        if not self.deferred or self.signal_name is not None:
            raise KeyboardInterrupt(name)
        self.signal_name = name
        print(f"\n{name}: stopping after this step to save a checkpoint (send it again to stop at once)", flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def signal_number(self) -> int:
        """The first signal's number; 0 for none."""
        return signal.Signals[self.signal_name].value if self.signal_name else 0


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Installs the handlers for the block (main thread only) and restores the previous ones after it."""
    request = StopRequest()
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
