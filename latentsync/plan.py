"""What a run is made of: the ``Plan`` decided once per video (``make_plan``), the ``RenderPart``s rendered from it
(anywhere, in any number of chunk ranges), and the ``LipSyncResult`` that ``finish`` makes of them. All picklable.

Planning is pass 1 (``tracking``: one face followed, only its smoothed 2×3 matrix kept per frame) with Whisper
running beside it, then the output's length and frame order, the frames to edit (the options' time ranges) and
the sync spans.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentsync import audio as audio_mod
from latentsync import media
from latentsync import video as video_mod
from latentsync.facepool import Detectors
from latentsync.length import OpenLength, edits, scored_spans
from latentsync.loader import Models
from latentsync.options import OUTPUT_FPS, RunOptions
from latentsync.progress import Progress, Watched, as_progress
from latentsync.speaker import active_speaker_point
from latentsync.control import StageClock
from latentsync.syncscore import syncnet_on
from latentsync.timeline import (Chunk, chunk_at, output_length, pad_with_silence, range_frames, source_index,
                                 touched_chunks)
from latentsync.tracking import FaceTrack

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything ``render`` and ``finish`` need, decided once per video; picklable (paths, arrays, numbers)."""

    video: Path
    audio: Path
    options: RunOptions  # validated, with the concrete seed of this run
    info: video_mod.VideoInfo
    fps: float  # processing and output frame rate
    wav: np.ndarray  # 16 kHz mono float32, padded with silence to the output's length where `silence` needs it
    features: np.ndarray  # Whisper features (rows, states, hidden) of ``wav``
    matrices: np.ndarray  # (num_source, 2, 3) float32 frame→crop matrices, NaN where the face is missing
    has_face: np.ndarray  # (num_source,) bool
    num_out: int  # output frames
    order: str  # "bounce" or "loop": the source order past the video's end
    chunk_size: int  # output frames per chunk (the model's 16)
    sync_spans: list[tuple[int, int]]  # output-frame spans whose generated crops are scored
    seconds: dict[str, float] = field(default_factory=dict)  # busy seconds of planning
    # Per output frame, the lip-synced face's share (1 in the ranges, fading to 0 beyond); None: 1 everywhere.
    weights: np.ndarray | None = None
    ranges: tuple[tuple[float, float], ...] = ()  # the options' ranges cut to the output (empty: the whole video)
    face_start: int = 0  # source frames before it were not tracked: a ranged run edits none that shows them
    # A streamed plan whose length waits on pass 1 (``cut_off``, ``silence``): what settles it. Until then
    # ``num_out`` is the container's estimate and the fields that follow from the length are provisional.
    pending: OpenLength | None = field(default=None, repr=False, compare=False)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_out / self.chunk_size)

    @property
    def frames_with_face(self) -> int:
        """Output frames in the ranges (all of them without ranges) that show the face."""
        return sum(bool(self.has_face[source_index(j, len(self.has_face), self.order)]) for j in range(self.num_out)
                   if self.weights is None or self.weights[j] == 1)

    def edited(self, chunk: int) -> bool:
        """Whether output chunk ``chunk`` holds a frame of a range or its fade (else it passes through)."""
        size = self.chunk_size
        return self.weights is None or bool(self.weights[chunk * size:(chunk + 1) * size].any())

    def streamed_chunk(self, track: FaceTrack, index: int) -> Chunk | None:
        """Chunk ``index`` of a streamed plan once pass 1 has tracked what it shows and, while the output's length is
        pending, once it is certain whatever that length turns out; None past the output's end."""
        size = self.chunk_size
        while self.pending is not None:
            if self.pending.known(track):
                self.pending.settle(self, track)
                self.pending = None
                break
            chunk = self.pending.early(self, track, index)
            if chunk is not None:
                return chunk
            track.ensure(len(track.matrices) + size)
            track.check()
        if index >= self.num_chunks:
            return None
        track.ensure((index + 1) * size)
        track.check()
        return chunk_at(index, size, self.num_out, self.order, self.has_face, self.weights)


@dataclass
class RenderPart:
    """What ``render`` wrote: a silent H.264 file of output chunks ``chunks``, busy seconds and the sync crops."""

    path: Path
    chunks: range
    frames: int
    seconds: dict[str, float]
    sync_scores: dict[tuple[int, int], Any]  # span of ``Plan.sync_spans`` → its SyncScore (None: unscorable)
    sync_crops: dict[int, np.ndarray]  # output frame → SyncNet crop, for the spans not scored here


@torch.inference_mode()
def make_plan(video: Path, audio: Path, opts: RunOptions, models: Models, caps: media.MediaCaps,
              detectors: Detectors, face_workers: int, *, cancel: Any, progress: bool | Progress,
              stream: bool) -> tuple[Plan, FaceTrack]:
    """Probe, audio features, face pass 1, output length and order, sync spans; and the face track.

    With ``stream`` pass 1 is left running: the plan's matrices are the open track's growing lists, for the render
    to advance (``Plan.streamed_chunk``). Where the output's length is the video's (``cut_off``, ``silence``) it
    is settled on the way (``plan.pending``). Otherwise the track has ended and been checked.
    """
    progress = as_progress(progress)
    cancel = Watched(cancel, progress)  # each cancel check lets timed progress lines speak
    clock = StageClock()
    with clock("probe"):
        info = video_mod.probe(video, max_side=caps.max_side, max_duration=caps.max_duration)
        wav = audio_mod.load_audio(audio, max_duration=caps.max_duration)
    fps = info.fps if opts.keep_fps else OUTPUT_FPS
    face_point = opts.face_point
    if opts.face_select == "active_speaker":
        with clock("active_speaker"), syncnet_on(models.syncnet, models.device) as syncnet:
            face_point = active_speaker_point(syncnet, video, fps, info, caps.max_duration)
    with clock("audio"):
        mel = audio_mod.log_mel(wav)
    # The features have M // 2 rows for M mel frames: the face pass needs only that count.
    audio_frames = audio_mod.audio_frame_count(torch.empty((mel.shape[1] // 2, 0, 0)), fps)
    # How many source frames matter: `silence` may use the whole video, other modes at most the audio's length.
    limit = None if opts.loop_mode == "silence" else audio_frames
    with clock("faces"):
        pool, landmarker = detectors.get(face_workers)

    rows = _feature_rows(opts.ranges, fps, models.num_frames)

    def features_of(mel: torch.Tensor) -> np.ndarray:
        with clock("audio"):
            return _features(models.audio_encoder, mel, rows).float().cpu().numpy()

    def encode(mel: torch.Tensor) -> np.ndarray:  # on the models' GPU thread, like all their GPU work
        return models.gpu.run(features_of, mel)

    pending = None
    if stream:
        features = encode(mel)
        if opts.loop_mode in ("cut_off", "silence"):
            pending = OpenLength(opts, video, fps, audio_frames, models.num_frames, models.syncnet is not None,
                                 wav, mel, features, features_of, encode, clock,
                                 estimate=video_mod.expected_frames(info, fps))
    track = FaceTrack(video, fps, info, limit, face_point, models.resolution, clock=clock, pool=pool,
                      landmarker=landmarker, cancel=cancel, progress=progress,
                      **_face_window(opts.ranges, fps, models.num_frames))
    if stream:
        # A pending length starts as the container's count: the render's progress total until the pass tells.
        sources = audio_frames if pending is None else max(video_mod.expected_frames(info, fps), 1)
        num_out, order = output_length(opts.loop_mode, sources, audio_frames)
        matrices, has_face = track.matrices, track.has_face
    else:
        # Whisper runs beside the face pass (waited for, also on error: no work of the plan outlives it).
        encoding = models.gpu.submit(features_of, mel)
        try:
            matrices, has_face = track.finish()
        finally:
            wait([encoding])
        features = encoding.result()
        num_out, order = output_length(opts.loop_mode, len(matrices), audio_frames)
        log.info("%s: %d source frames, %d with a face", video, len(matrices), int(has_face.sum()))
    weights, ranges, scored = None, (), []  # a pending length's: its spans are added as they become certain
    if pending is None:
        if num_out > audio_frames:
            wav = pad_with_silence(wav, num_out, fps)
            features = encode(audio_mod.log_mel(wav))
        log.info("%s: %d output frames at %.3f fps, loop mode %s", video, num_out, fps, opts.loop_mode)
        weights, ranges, spans = edits(video, opts.ranges, fps, num_out)
        scored = scored_spans(spans) if models.syncnet is not None else []
    plan = Plan(video=video, audio=audio, options=opts, info=info, fps=fps, wav=wav, features=features,
                matrices=matrices, has_face=has_face, num_out=num_out, order=order, chunk_size=models.num_frames,
                sync_spans=scored, seconds=clock.seconds, weights=weights, ranges=ranges, face_start=track.start,
                pending=pending)
    return plan, track


def _face_window(ranges: tuple[tuple[float, float], ...], fps: float, size: int) -> dict[str, int | None]:
    """The source frames the face pass must track (``FaceTrack``'s ``first`` and ``horizon``; all without ranges):
    from the start of the first chunk the ranges touch to the end of the last.

    Before the horizon an output frame is its own source frame, and each chunk aligns and pastes with its own
    frames' matrices; a chunk's random draws do not depend on other chunks' frames. Ranges covering the whole
    output reach past its end, so track all."""
    if not ranges:
        return {"first": 0, "horizon": None}
    end = 2**40  # the output's length is not known yet
    chunks = touched_chunks(range_frames(ranges, fps, end), size, end)
    return {"first": chunks[0] * size, "horizon": (chunks[-1] + 1) * size}


def _feature_rows(ranges: tuple[tuple[float, float], ...], fps: float, size: int) -> list[tuple[int, int]] | None:
    """Whisper feature rows the chunks touching ``ranges`` read (None: all), wherever the output ends."""
    if not ranges:
        return None
    end = 2**40  # the output's length is not known yet; frames past it are never rendered
    per_frame = audio_mod.FEATURES_PER_SECOND / fps
    offsets = audio_mod.WINDOW_OFFSETS
    return [(math.floor(c * size * per_frame) + int(offsets.min()) - 1,
             math.ceil(((c + 1) * size - 1) * per_frame) + int(offsets.max()) + 2)
            for c in touched_chunks(range_frames(ranges, fps, end), size, end)]


def _features(encoder: Any, mel: torch.Tensor, rows: list[tuple[int, int]] | None) -> torch.Tensor:
    """Whisper features of ``mel``; with ``rows``, only the 30 s windows holding those rows are encoded (windows are
    encoded independently, so theirs are the whole file's very rows), the other rows are zeros, never read."""
    if rows is None:
        return encoder.features_from_log_mel(mel)
    n_mel, window = mel.shape[1], audio_mod.N_FRAMES
    out = torch.zeros(n_mel // 2, encoder.num_states, encoder.hidden_size)
    for start in range(0, n_mel, window):
        lo, hi = start // 2, min(start + window, n_mel) // 2
        if any(a < hi and lo < b for a, b in rows):
            out[lo:hi] = encoder.features_from_log_mel(mel[:, start:start + window])
    return out
