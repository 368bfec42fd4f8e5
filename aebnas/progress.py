"""Progress lines for long work inside an epoch: steps done, images/s and time left.

An epoch of the full-size supernet takes minutes to hours on a CPU; without a line inside it a
user cannot tell a slow run from a hung one. ``Progress`` prints at most one line every
``every_s`` seconds (none for an epoch shorter than that).
"""

from __future__ import annotations

import time
from typing import Callable

Log = Callable[[str], None]  # where a long command's lines go


def print_line(message: str) -> None:
    """The default :data:`Log`: the line on stdout at once (a command's output is often a log file)."""
    print(message, flush=True)


def duration(seconds: float) -> str:
    """``seconds`` as ``"42 s"``, ``"3 min 5 s"`` or ``"2 h 04 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Call :meth:`update` after every step; a line goes to ``log`` every ``every_s`` seconds.

    The rate and the time left come from the steps after the first once there are some: a first
    step that compiles (``--compile``) or warms up a GPU can take minutes, and an estimate that
    counted it would be off by as much for the whole epoch.
    """

    def __init__(self, label: str, total_steps: int, log: Log, every_s: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.label, self.total, self.log, self.every_s, self.clock = label, total_steps, log, every_s, clock
        self.start = self.last = clock()
        self.first: tuple[float, int] | None = None  # (time, images) at the end of step 1

    def update(self, steps_done: int, images_done: int) -> None:
        """Log ``label: step k/n (p%), r images/s, t left`` when ``every_s`` passed since the last line."""
        now = self.clock()
        if steps_done == 1 and self.first is None:
            self.first = (now, images_done)
        if now - self.last < self.every_s or steps_done <= 0:
            return
        self.last = now
        slow_first = ""
        if self.first is not None and steps_done > 1:
            t1, images1 = self.first
            steps, images, elapsed = steps_done - 1, images_done - images1, now - t1
            if t1 - self.start > 2 * elapsed / steps:
                slow_first = f" (first step {duration(t1 - self.start)})"
        else:
            steps, images, elapsed = steps_done, images_done, now - self.start
        left = elapsed / steps * max(self.total - steps_done, 0)
        self.log(f"{self.label}: step {steps_done}/{self.total} ({100 * steps_done / max(self.total, 1):.0f}%), "
                 f"{images / max(elapsed, 1e-9):.0f} images/s{slow_first}, {duration(left)} left in the epoch")
