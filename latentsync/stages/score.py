"""Synthesis stage 4, sync scoring: each sampled span is scored as soon as its generated crops are all there.

Where SyncNet lives on the run's device (the CPU, or a GPU with room for it in fp16) the scoring overlaps the other
stages, on its thread's low-priority stream on a GPU. Where it waits in CPU memory for a GPU run, the spans are
scored once rendering is done (``score_now=False``: crops are only collected). A span only partly inside a
rendered chunk range is left to ``LipSync.finish``.
"""
from __future__ import annotations

import numpy as np

from latentsync.control import StageClock
from latentsync.length import OpenPlan
from latentsync.loader import Models
from latentsync.plan import Plan
from latentsync.stages.work import Work
from latentsync.syncscore import SyncScore, score_span


class ScoreStage:
    """Collects the crops of the plan's sync spans and, with ``score_now``, scores every span wholly inside
    ``frames``."""

    def __init__(self, plan: Plan | OpenPlan, models: Models, clock: StageClock, frames: range, score_now: bool):
        self.syncnet, self.spans, self.clock = models.syncnet, plan.sync_spans, clock
        self.wav, self.fps = plan.wav, plan.fps
        self.todo = [s for s in self.spans if score_now and frames.start <= s[0] and s[1] <= frames.stop]
        self.scores: dict[tuple[int, int], SyncScore | None] = {}
        self.crops: dict[int, np.ndarray] = {}  # output frame → crop, for spans not scored yet
        self.stream = models.threads.score.stream  # the stage runs on that thread, on this stream

    def __call__(self, work: Work) -> None:
        self.crops.update(work.sync)
        for span in [s for s in self.todo if all(j in self.crops for j in range(*s))]:
            assert self.syncnet is not None  # a plan lists sync spans only when SyncNet is loaded
            with self.clock("sync"):
                self.scores[span] = score_span(self.syncnet, span, self.crops, self.wav, self.fps)
            self.todo.remove(span)
            # Crops that no unscored span needs are dropped: memory stays at a span or two.
            unscored = [s for s in self.spans if s not in self.scores]
            self.crops = {j: c for j, c in self.crops.items() if any(a <= j < b for a, b in unscored)}


def scores_while_rendering(models: Models) -> bool:
    """Whether SyncNet is where the run's work is (the CPU, or resident on the GPU), so spans are scored as they
    are rendered."""
    return models.syncnet is not None and next(models.syncnet.parameters()).device == models.device
