"""aebnas.progress: a line inside long epochs, at most one per interval, with what is left."""

from aebnas.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_with_rate_and_time_left():
    clock, lines = Clock(), []
    progress = Progress("supernet epoch 2/60", total_steps=400, log=lines.append, every_s=30, clock=clock)
    clock.now += 10
    progress.update(20, 2560)  # 10 s in: too soon for a line
    assert lines == []
    clock.now += 30
    progress.update(100, 12800)  # 40 s for 100 steps of 128 images: 320 images/s, 300 steps = 120 s left
    assert lines == ["supernet epoch 2/60: step 100/400 (25%), 320 images/s, 2 min 0 s left in the epoch"]
    clock.now += 5
    progress.update(110, 14080)
    assert len(lines) == 1  # 5 s after the last line


def test_a_slow_first_step_does_not_spoil_the_rate_or_the_time_left():
    """A first step that compiles (or warms up a GPU) for minutes: rate and time left come from the others."""
    clock, lines = Clock(), []
    progress = Progress("supernet epoch 1/60", total_steps=101, log=lines.append, every_s=30, clock=clock)
    clock.now += 200  # step 1: compiling
    progress.update(1, 128)
    assert lines == ["supernet epoch 1/60: step 1/101 (1%), 1 images/s, 5 h 33 min left in the epoch"]
    for step in range(2, 52):  # then 0.64 s a step: 200 images/s
        clock.now += 0.64
        progress.update(step, 128 * step)
    assert lines[-1] == ("supernet epoch 1/60: step 48/101 (48%), 200 images/s (first step 3 min 20 s), "
                         "34 s left in the epoch")  # 30 s after the first line: 53 steps of 0.64 s left


def test_durations_read_as_people_write_them():
    assert duration(42.4) == "42 s"
    assert duration(185) == "3 min 5 s"
    assert duration(2 * 3600 + 4 * 60 + 10) == "2 h 04 min"
