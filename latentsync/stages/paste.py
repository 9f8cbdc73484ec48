"""Synthesis stage 3, paste back and encode: generated faces into their frames, frames into the H.264 writer."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.control import StageClock
from latentsync.devices import pick_rows
from latentsync.length import OpenPlan
from latentsync.loader import Models
from latentsync.plan import Plan
from latentsync.progress import SYNTHESIS, Progress
from latentsync.stages.cuda import take
from latentsync.stages.work import FaceSource, Work
from latentsync.syncscore import sync_crop
from latentsync.timeline import Chunk


class PasteStage:
    """Restores each chunk's faces into its frames (on the faces' device) and streams the frames to ``writer``.

    ``tap(j, frame)``, when given, sees every output frame ``j`` just before it is encoded (tests compare runs
    there, before the codec's rounding).
    """

    def __init__(self, plan: Plan | OpenPlan, faces: FaceSource, models: Models, clock: StageClock,
                 writer: video_mod.VideoWriter, progress: Progress,
                 tap: Callable[[int, np.ndarray], None] | None = None):
        self.writer, self.faces, self.clock, self.progress, self.tap = writer, faces, clock, progress, tap
        self.plan = plan  # an open plan's sync spans grow at the end while the stage reads them
        self.aligner = FaceAligner(models.resolution)
        self.stream = models.threads.paste.stream  # the stage runs on that thread, on this stream

    def __call__(self, work: Work) -> Work:
        chunk = work.chunk
        frames = [work.frames[s] for s in chunk.src]
        if work.faces is not None:
            take(work.faces, work.ready)
            self._sync_crops(work.chunk, work.faces, work)
            with self.clock("restore"):
                self._restore(work.chunk, work.faces, frames)
        with self.clock("encode"):
            for k, frame in enumerate(frames):
                if self.tap is not None:
                    self.tap(chunk.start + k, frame)
                self.writer.write(frame)
        self.progress.advance(SYNTHESIS, len(frames))
        work.frames, work.faces = {}, None  # only the sync crops travel on
        return work

    def _restore(self, chunk: Chunk, faces: torch.Tensor, frames: list[np.ndarray]) -> None:
        keep = [k for k, h in enumerate(chunk.has_face) if h and chunk.share(k) > 0]
        restored = self.aligner.restore_batch([frames[k] for k in keep], pick_rows(faces, keep),
                                              [self.faces.matrix(chunk.src[k]) for k in keep])
        for k, frame in zip(keep, restored, strict=True):
            assert isinstance(frame, np.ndarray)  # restore_batch gives back frames of the kind it was given
            w = chunk.share(k)
            # In a range's fade the pasted face is mixed into the source frame: no jump at the range's edge.
            if w != 1:
                frame = np.rint(w * frame.astype(np.float32) + (1 - w) * frames[k].astype(np.float32)).astype(np.uint8)
            frames[k] = frame

    def _sync_crops(self, chunk: Chunk, faces: torch.Tensor, work: Work) -> None:
        """SyncNet's crops of the generated ``faces`` of this chunk's frames that lie in a sampled span, into
        ``work``."""
        start = chunk.start
        wanted = [k for k in range(len(chunk.src)) if any(a <= start + k < b for a, b in self.plan.sync_spans)]
        if wanted:
            with self.clock("sync"):
                crops = sync_crop(pick_rows(faces, wanted))
                work.sync = dict(zip((start + k for k in wanted), crops, strict=True))
