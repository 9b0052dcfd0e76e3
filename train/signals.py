"""Stop requests: SIGTERM, SIGINT and SIGUSR1 end a run cleanly at the next step boundary (train/loop.py)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

log = logging.getLogger("detoxrl.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM / SIGINT / SIGUSR1 so the loop stops at the next step boundary, after a checkpoint.

    A second SIGINT aborts at once (KeyboardInterrupt), and so does a SIGTERM after a SIGINT: that is how torchrun
    (`accelerate launch`) relays a second Ctrl-C to its workers. Repeated SIGTERM / SIGUSR1 are only logged: SLURM
    and launchers often deliver one request twice (to the process and through its parent).

    A SIGINT that was ignored when training started stays ignored. A shell starts a background job (`cmd &`,
    `nohup cmd &`, many CI runners) with SIGINT ignored so that Ctrl-C at the terminal does not reach it; POSIX
    programs keep it that way (Python itself does not install its KeyboardInterrupt handler then), and so does the
    trainer: such a job stops on SIGTERM or SIGUSR1. On exit every handler is restored to exactly what was found
    (one that was not set from Python, which `signal.signal` cannot give back, becomes SIG_DFL).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for s in STOP_SIGNALS:
                if s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # a background job: Ctrl-C is not meant for it
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: finishing the current step, then writing a checkpoint and stopping (Ctrl-C "
                        "again aborts at once)", self.name)
        elif signum == signal.SIGINT or (signum == signal.SIGTERM and self.signum == signal.SIGINT):
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} after {self.name}: aborted")
        else:
            log.warning("received %s again: already stopping after this step", signal.Signals(signum).name)

