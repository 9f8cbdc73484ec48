"""Synthesis stage 1, fetch and align: a chunk's source frames and the face crops the model sees."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.frames import FrameFetcher
from latentsync.stages import StageClock, made, on_stream, own_stream
from latentsync.timeline import Chunk, nearest_with_face


@dataclass
class Work:
    """One chunk on its way through the synthesis stages."""

    chunk: Chunk
    frames: dict[int, np.ndarray]  # source frame index → RGB frame
    pixels: torch.Tensor | None = None  # (f, 3, R, R) aligned faces in [−1, 1], model dtype, on the device
    faces: torch.Tensor | None = None  # (f, 3, R, R) generated faces, original pixels outside the mouth mask
    sync: dict[int, np.ndarray] = field(default_factory=dict)  # output frame → SyncNet crop (sampled spans only)
    ready: Any = None  # CUDA event after the kernels that made ``pixels`` or ``faces`` (None off CUDA)


class AlignStage:
    """Reads each chunk's frames (one forward stream) and warps its faces into R×R crops on ``device``."""

    def __init__(self, video: Path, fps: float, info: video_mod.VideoInfo, matrices: np.ndarray, resolution: int,
                 device: torch.device, dtype: torch.dtype, clock: StageClock):
        self.fetcher = FrameFetcher(video, fps, info)
        self.aligner = FaceAligner(resolution, device=device)  # warps run where the model runs
        self.matrices, self.device, self.dtype, self.clock = matrices, device, dtype, clock
        self.stream = own_stream(device)

    def __call__(self, chunk: Chunk) -> Work:
        with self.clock("read"):
            frames = self.fetcher.get(chunk.src)
        if not chunk.any_face:
            return Work(chunk, frames)
        with self.clock("align"), on_stream(self.stream):
            # The model sees 16 frames at once; frames without the face borrow the nearest crop that has it.
            fill = nearest_with_face(list(chunk.has_face))
            sources = sorted({chunk.src[f] for f in fill})
            crops = dict(zip(sources, self.aligner.warp_batch([frames[s] for s in sources],
                                                              [self.matrices[s] for s in sources])))
            faces = np.stack([crops[chunk.src[f]] for f in fill])
            pixels = torch.from_numpy(faces).to(self.device).permute(0, 3, 1, 2).float()
            pixels = (pixels / 127.5 - 1).to(self.dtype)  # scaled in fp32, then cast, as upstream
            return Work(chunk, frames, pixels, ready=made(self.device))

    def close(self) -> None:
        self.fetcher.close()
