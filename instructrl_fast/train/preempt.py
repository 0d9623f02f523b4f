"""Preemption: SIGTERM and SIGINT stop a run cleanly.

Inside a stage's training loop (``listening``) a signal is only recorded: the loop writes a checkpoint at its next
optimizer-step boundary and raises ``Preempted``, which names the checkpoint. Outside a loop (loading models,
evaluating) and on a second signal the handler raises ``Interrupted`` at once: waiting for a boundary is only worth
it while training state would be lost. Under torchrun every rank receives the signal (the launcher forwards it, a
terminal's Ctrl-C reaches the whole process group) and the loop all-reduces it, so every rank stops at the same step.
The CLI turns either exception into one line on stderr and the shell's exit code for the signal (130 / 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A signal stopped the run where no checkpoint could be written first (a BaseException, like
    KeyboardInterrupt: handlers of ordinary errors let it through)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process its signal ended: 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class Preempted(Interrupted):
    """A signal stopped a stage after it wrote the checkpoint ``checkpoint`` at optimizer step ``step``."""

    def __init__(self, signum: int, *, stage: str, step: int, max_steps: int, checkpoint):
        super().__init__(signum)
        self.stage, self.step, self.max_steps, self.checkpoint = stage, step, max_steps, checkpoint


class _State:
    pending: int | None = None  # the first signal received while a loop listens
    listening: int = 0  # nesting depth of ``listening``


_STATE = _State()


def _handler(signum, frame) -> None:
    if _STATE.listening and _STATE.pending is None:
        _STATE.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handling_signals():
    """SIGTERM and SIGINT raise ``Interrupted`` (or, inside ``listening``, wait for the loop) while the block runs;
    the previous handlers come back after it. A no-op outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def listening():
    """Around a training loop: a signal is recorded for ``pending`` instead of interrupting the step."""
    with handling_signals():
        _STATE.listening += 1
        try:
            yield
        finally:
            _STATE.listening -= 1
            if not _STATE.listening:
                _STATE.pending = None


def pending() -> int:
    """The signal received since the loop began listening, 0 if none."""
    return _STATE.pending or 0
