"""Progress told once: the log lines' 10 % / 30 s rule and ETA on a fake clock, the bars, the API's ``progress``."""
from __future__ import annotations

import io
import re
import threading

import pytest

from latentsync.progress import Bars, LogLines, Progress, Watched, as_progress, clock_text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged():
    """A progress whose log lines land in a list, on a clock the test moves."""
    clock, lines = FakeClock(), []
    return Progress(LogLines(lines.append, clock=clock)), lines, clock


def test_a_stage_is_named_as_it_starts_and_timed_as_it_ends(logged):
    progress, lines, clock = logged
    progress.start("weights")
    clock.now += 75
    progress.end("weights")
    progress.start("synthesis", 400)
    assert lines == ["weights started", "weights done in 1:15", "synthesis started (400 frames)"]


def test_a_line_each_time_another_ten_percent_is_done(logged):
    progress, lines, clock = logged
    progress.start("synthesis", 400)
    for _ in range(25):  # 16-frame chunks, one second each
        clock.now += 1
        progress.advance("synthesis", 16)
    percents = [line for line in lines if "%" in line]
    assert len(percents) == 9, lines  # 10 % … 90 %; reaching 100 % is the end line's
    assert percents[3] == "synthesis 40 % (160/400 frames), ETA 0:15"  # 10 s for 160 frames: 15 s for 240
    assert all("100 %" not in line for line in lines)
    progress.end("synthesis")
    assert lines[-1] == "synthesis done in 0:25 (400 frames)"


def test_a_slow_stage_gets_a_line_every_30_seconds_and_no_more(logged):
    progress, lines, clock = logged
    progress.start("synthesis", 1000)
    for _ in range(60):  # 1 frame every 1 s: 0.1 % a step
        clock.now += 1
        progress.advance("synthesis", 1)
    assert lines[1:] == ["synthesis 3 % (30/1000 frames), ETA 16:10", "synthesis 6 % (60/1000 frames), ETA 15:40"]


def test_percent_and_time_rules_share_one_last_line(logged):
    progress, lines, clock = logged
    progress.start("faces", 100)
    clock.now += 29
    progress.advance("faces", 10)  # 10 %: a line, which restarts the 30 s
    clock.now += 29
    progress.advance("faces", 1)
    assert len(lines) == 2
    clock.now += 1
    progress.advance("faces", 1)  # 30 s since the 10 % line
    assert lines[-1] == "faces 12 % (12/100 frames), ETA 7:13"  # 59 s for 12 frames: 433 s for 88


def test_ticks_speak_after_30_seconds_without_a_frame(logged):
    progress, lines, clock = logged
    progress.start("encoding")
    clock.now += 29
    progress.tick()
    assert lines == ["encoding started"]
    clock.now += 1
    progress.tick()
    progress.tick()
    assert lines == ["encoding started", "encoding 0:30 so far"]
    progress.start("synthesis", 160)
    clock.now += 3600
    progress.advance("synthesis", 16)
    clock.now += 30
    progress.tick()  # no new frame: the ETA grows with the wait
    assert lines[-3] == "synthesis 10 % (16/160 frames), ETA 9:00:00"
    assert lines[-2:] == ["encoding 1:01:00 so far", "synthesis 10 % (16/160 frames), ETA 9:04:30"]


def test_a_failed_stage_is_not_reported_done(logged):
    progress, lines, _ = logged
    with pytest.raises(RuntimeError):
        with progress.stage("scoring"):
            raise RuntimeError("boom")
    assert lines == ["scoring started"]
    progress.end("scoring")  # again: nothing
    progress.advance("scoring", 5)  # a stage no longer open: nothing
    assert lines == ["scoring started"]


def test_thresholds_are_parameters(logged):
    clock, lines = FakeClock(), []
    progress = Progress(LogLines(lines.append, every_percent=1, every_s=1e9, clock=clock))
    progress.start("faces", 200)
    for _ in range(199):
        progress.advance("faces", 1)
    assert len(lines) == 1 + 99  # a line each 1 % (2 frames), none at 100 %


def test_progress_from_several_threads_counts_every_frame():
    lines = []
    progress = Progress(LogLines(lines.append, every_percent=100, every_s=1e9))
    progress.start("synthesis", 8000)
    threads = [threading.Thread(target=lambda: [progress.advance("synthesis") for _ in range(1000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.end("synthesis")
    assert lines[-1].endswith("(8000 frames)")


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (42.4, "0:42"), (59.6, "1:00"), (723, "12:03"),
                                           (3723, "1:02:03"), (-5, "0:00")])
def test_clock_text(seconds, text):
    assert clock_text(seconds) == text


def test_bars_draw_each_counted_stage_and_close_it():
    out = io.StringIO()
    progress = Progress(Bars(file=out, mininterval=0))
    progress.start("weights")  # counts no frames: no bar
    progress.start("synthesis", 32)
    progress.advance("synthesis", 16)
    progress.advance("synthesis", 16)
    progress.end("synthesis")
    text = out.getvalue()
    assert "synthesis" in text and "32/32" in text and "frame" in text and "weights" not in text


def test_the_api_takes_true_false_or_a_progress():
    assert [type(listener) for listener in as_progress(True).listeners] == [Bars]
    assert as_progress(False).listeners == () and as_progress(None).listeners == ()
    mine = Progress()
    assert as_progress(mine) is mine


def test_every_cancel_check_of_a_run_lets_timed_lines_speak(logged):
    """The library wraps a run's ``cancel`` so, whoever calls it (Cog, the CLI, a batch worker, the API), a stretch
    of denoising steps without a finished frame still gets its 30 s line; the caller's cancel still decides."""
    progress, lines, clock = logged
    progress.start("synthesis", 100)
    event = threading.Event()
    watched, never = Watched(event, progress), Watched(None, progress)
    clock.now += 31
    assert watched.is_set() is False and lines[-1] == "synthesis 0 % (0/100 frames), ETA unknown"
    event.set()
    assert watched.is_set() is True and never.is_set() is False


def test_a_stage_ends_with_its_last_frame_whenever_the_run_closes_it(logged):
    """The face pass is closed with the run; its end line (and bar) tell its own time, not the run's."""
    progress, lines, clock = logged
    progress.start("faces", 200)
    clock.now += 8
    progress.advance("faces", 200)
    assert lines[-1] == "faces done in 0:08 (200 frames)"
    clock.now += 9  # the rest of the run
    progress.end("faces")
    assert lines[-1] == "faces done in 0:08 (200 frames)" and len(lines) == 2


def test_a_bar_closes_with_its_last_frame():
    out = io.StringIO()
    progress = Progress(Bars(file=out, mininterval=0))
    progress.start("faces", 10)
    progress.advance("faces", 9)
    assert not out.getvalue().endswith("\n")  # open: tqdm redraws it in place
    progress.advance("faces", 1)
    text = out.getvalue()
    assert text.endswith("\n") and "10/10" in text.splitlines()[-1]  # closed, left on screen at 100 %


def test_log_lines_are_written_above_the_open_bars_not_into_them():
    import logging

    from latentsync.progress import BarSafeHandler

    out = io.StringIO()
    progress = Progress(Bars(file=out, mininterval=0))
    log = logging.getLogger("test_progress.bars")
    handler = BarSafeHandler(out)
    log.addHandler(handler)
    log.propagate = False
    try:
        progress.start("faces", 10)
        progress.start("synthesis", 32)
        progress.advance("faces", 3)
        log.warning("a line while two bars are open")
        progress.advance("synthesis", 16)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    line = next(line for line in text.split("\n") if "a line while" in line)
    # The bars were cleared first: only carriage returns and tqdm's cursor-up moves precede the line.
    assert re.sub(r"\x1b\[\d*A", "", line.split("\r")[-1]) == "a line while two bars are open", repr(line)
    after = text.split("a line while two bars are open\n", 1)[1]
    assert "3/10" in after and "16/32" in after  # and drawn again below it
    progress.end("synthesis")
    progress.end("faces")
