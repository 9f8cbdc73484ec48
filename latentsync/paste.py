"""Synthesis stage 3, paste back and encode: generated faces into their frames, frames into the H.264 writer."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.crops import Work
from latentsync.stages import StageClock


class PasteStage:
    """Restores each chunk's faces into its frames (on the faces' device) and streams the frames to ``writer``.

    ``tap(j, frame)``, when given, sees every output frame ``j`` just before it is encoded (tests compare runs
    there, before the codec's rounding).
    """

    def __init__(self, writer: video_mod.VideoWriter, matrices: np.ndarray, resolution: int, clock: StageClock,
                 bar: tqdm, tap: Callable[[int, np.ndarray], None] | None = None):
        self.writer, self.matrices, self.clock, self.bar, self.tap = writer, matrices, clock, bar, tap
        self.aligner = FaceAligner(resolution)

    def __call__(self, work: Work) -> Work:
        chunk = work.chunk
        frames = [work.frames[s] for s in chunk.src]
        if work.faces is not None:
            with self.clock("restore"):
                keep = [k for k, h in enumerate(chunk.has_face) if h]
                restored = self.aligner.restore_batch([frames[k] for k in keep], work.faces[keep],
                                                      [self.matrices[chunk.src[k]] for k in keep])
                for k, frame in zip(keep, restored):
                    frames[k] = frame
        with self.clock("encode"):
            for k, frame in enumerate(frames):
                if self.tap is not None:
                    self.tap(chunk.start + k, frame)
                self.writer.write(frame)
        self.bar.update(len(frames))
        work.frames, work.faces = {}, None  # only the sync crops travel on
        return work
