"""Synthesis stage 1, fetch and align: a chunk's source frames and the face crops the model sees."""
from __future__ import annotations

import numpy as np
import torch

from latentsync.align import FaceAligner
from latentsync.control import StageClock
from latentsync.devices import Staging
from latentsync.length import OpenPlan
from latentsync.loader import Models
from latentsync.plan import Plan
from latentsync.stages.cuda import made
from latentsync.stages.work import FaceSource, Work
from latentsync.timeline import Chunk, nearest_with_face
from latentsync.video.frames import FrameFetcher


class AlignStage:
    """Reads each chunk's frames (one forward stream) and warps its faces into R×R crops on ``device``."""

    def __init__(self, plan: Plan | OpenPlan, faces: FaceSource, models: Models, clock: StageClock):
        self.fetcher = FrameFetcher(plan.video, plan.fps, plan.info)
        self.staging = Staging(models.device)
        self.aligner = FaceAligner(models.resolution, device=models.device)  # warps run where the model runs
        self.faces, self.device, self.dtype, self.clock = faces, models.device, models.dtype, clock
        self.stream = models.threads.align.stream  # the stage runs on that thread, on this stream

    def __call__(self, chunk: Chunk) -> Work:
        with self.clock("read"):
            frames = self.fetcher.get(chunk.src)
        if not chunk.edited:  # no face, or outside the time ranges: the frames pass through
            return Work(chunk, frames)
        with self.clock("align"):
            # The model sees 16 frames at once; frames without the face borrow the nearest crop that has it.
            fill = nearest_with_face(list(chunk.has_face))
            sources = sorted({chunk.src[f] for f in fill})
            crops = dict(zip(sources, self.aligner.warp_batch([frames[s] for s in sources],
                                                              [self.faces.matrix(s) for s in sources]),
                             strict=True))
            pixels = crop_pixels(self.staging, np.stack([crops[chunk.src[f]] for f in fill]), self.dtype)
            return Work(chunk, frames, pixels, ready=made(self.device))

    def close(self) -> None:
        self.fetcher.close()


def crop_pixels(staging: Staging, faces: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Aligned crops (f, R, R, 3) uint8 as the model's input on the staging's device: (f, 3, R, R) in [−1, 1] in
    ``dtype``, scaled in fp32 then cast as upstream; NHWC memory seen as NCHW (channels-last strides)."""
    (pixels,) = staging.upload([faces])
    return (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).to(dtype)
