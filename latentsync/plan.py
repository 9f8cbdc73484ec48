"""What a run is made of: the ``Plan`` decided once per video (``make_plan``), the ``RenderPart``s rendered from it
(anywhere, in any number of chunk ranges), and the result that ``finish`` makes of them. All picklable.

Planning is pass 1 (``tracking``: one face followed, only its smoothed 2×3 matrix kept per frame) with Whisper
running beside it, then the output's length and frame order, the frames to edit (``timeline.Edits``) and the sync
spans. ``open_plan`` leaves pass 1 running instead: its ``OpenPlan`` (``length``) is the one live object of a run,
and ``close_plan`` makes the Plan of it once the render is done.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentsync import audio as audio_mod
from latentsync import video as video_mod
from latentsync.context import RunContext
from latentsync.control import StageClock
from latentsync.length import OpenLength, OpenPlan, scored_spans
from latentsync.models.whisper import AudioEncoder
from latentsync.options import OUTPUT_FPS, RunOptions
from latentsync.speaker import active_speaker_point
from latentsync.syncscore import SyncScore, syncnet_on
from latentsync.timeline import (
    Chunk,
    Edits,
    chunk_at,
    edited,
    output_length,
    pad_with_silence,
    range_frames,
    source_index,
)
from latentsync.tracking import FaceTrack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
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
    sync_spans: tuple[tuple[int, int], ...]  # output-frame spans whose generated crops are scored
    seconds: dict[str, float] = field(default_factory=dict)  # busy seconds of planning
    # Per output frame, the lip-synced face's share (1 in the ranges, fading to 0 beyond); None: 1 everywhere.
    blend: np.ndarray | None = None
    ranges: tuple[tuple[float, float], ...] = ()  # the options' ranges cut to the output (empty: the whole video)
    face_start: int = 0  # source frames before it were not tracked: a ranged run edits none that shows them

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_out / self.chunk_size)

    @property
    def frames_with_face(self) -> int:
        """Output frames in the ranges (all of them without ranges) that show the face."""
        return sum(bool(self.has_face[source_index(j, len(self.has_face), self.order)]) for j in range(self.num_out)
                   if self.blend is None or self.blend[j] == 1)

    def edited(self, chunk: int) -> bool:
        """Whether output chunk ``chunk`` holds a frame of a range or its fade (else it passes through)."""
        size = self.chunk_size
        return self.blend is None or bool(self.blend[chunk * size:(chunk + 1) * size].any())

    def faceless_ranges(self) -> list[tuple[float, float]]:
        """The ranges (seconds, cut to the output) in which no frame shows the face: nothing is edited there."""
        return [(a, b) for a, b in self.ranges
                if not any(self.has_face[source_index(j, len(self.has_face), self.order)]
                           for j in range(*range_frames(((a, b),), self.fps, self.num_out)[0]))]

    def matrix(self, src: int) -> np.ndarray:
        """The face's matrix in source frame ``src`` (the stages' face source)."""
        return self.matrices[src]

    def chunk(self, index: int) -> Chunk:
        """Output chunk ``index``: its frames' sources, faces and blend."""
        return chunk_at(index, self.chunk_size, self.num_out, self.order, self.has_face, self.blend)


@dataclass
class RenderPart:
    """What ``render`` wrote: a silent H.264 file of output chunks ``chunks``, busy seconds and the sync crops."""

    path: Path
    chunks: range
    frames: int
    seconds: dict[str, float]
    sync_scores: dict[tuple[int, int], SyncScore | None]  # span of ``Plan.sync_spans`` → its score (None: unscorable)
    sync_crops: dict[int, np.ndarray]  # output frame → SyncNet crop, for the spans not scored here


class _Planning:
    """What making a plan and opening one share: the audio, its features, the face to follow and pass 1."""

    @torch.inference_mode()
    def __init__(self, video: Path, audio: Path, info: video_mod.VideoInfo, opts: RunOptions, run: RunContext):
        models = run.models
        self.video, self.audio, self.info, self.opts, self.run = video, audio, info, opts, run
        self.clock = clock = StageClock()
        with clock("probe"):
            self.wav = audio_mod.load_audio(audio, max_duration=run.caps.max_duration)
        self.fps = fps = info.fps if opts.keep_fps else OUTPUT_FPS
        face_point = opts.face_point
        if opts.face_select == "active_speaker":
            with clock("active_speaker"), syncnet_on(models.syncnet, models.device) as syncnet:
                face_point = active_speaker_point(syncnet, video, fps, info, run.caps.max_duration)
        with clock("audio"):
            self.mel = audio_mod.log_mel(self.wav)
        # The features have M // 2 rows for M mel frames: the face pass needs only that count.
        self.audio_frames = audio_mod.audio_frame_count(torch.empty((self.mel.shape[1] // 2, 0, 0)), fps)
        self.edits = Edits.of(opts.ranges, fps, models.num_frames)
        with clock("faces"):
            pool, landmarker = run.detectors.get(run.face_workers)
        first, horizon = (0, None) if self.edits is None else self.edits.face_window
        # How many source frames matter: `silence` may use the whole video, other modes at most the audio's length.
        limit = None if opts.loop_mode == "silence" else self.audio_frames
        self.track = FaceTrack.open(video, fps, info, limit, face_point, models.resolution, clock=clock, pool=pool,
                                    landmarker=landmarker, cancel=run.cancel, progress=run.progress,
                                    first=first, horizon=horizon)

    def features_of(self, mel: torch.Tensor) -> np.ndarray:
        """Whisper features of ``mel`` (only the windows the edits read), on the calling thread."""
        rows = None if self.edits is None else self.edits.feature_rows
        with self.clock("audio"):
            return _features(self.run.models.audio_encoder, mel, rows).float().cpu().numpy()

    def encode(self, mel: torch.Tensor) -> np.ndarray:
        """:meth:`features_of` on the models' GPU thread, like all their GPU work."""
        return self.run.models.gpu.run(self.features_of, mel)

    def settled(self, num_out: int, features: np.ndarray) -> dict:
        """The fields that follow from the output's length: audio padded where the video is longer, features, what
        is edited, the sync spans."""
        wav = self.wav
        if num_out > self.audio_frames:
            wav = pad_with_silence(wav, num_out, self.fps)
            features = self.encode(audio_mod.log_mel(wav))
        log.info("%s: %d output frames at %.3f fps, loop mode %s", self.video, num_out, self.fps, self.opts.loop_mode)
        edit = edited(self.edits, num_out)
        scored = scored_spans(list(edit.spans)) if self.run.models.syncnet is not None else []
        return dict(num_out=num_out, wav=wav, features=features, blend=edit.blend, ranges=edit.ranges,
                    sync_spans=scored)


@torch.inference_mode()
def make_plan(video: Path, audio: Path, info: video_mod.VideoInfo, opts: RunOptions, run: RunContext) -> Plan:
    """Audio features, the whole of face pass 1 (Whisper beside it), output length and order, edits, sync spans.

    ``info`` is the video's probe (``preflight``); ``opts`` carries the run's seed.
    """
    p = _Planning(video, audio, info, opts, run)
    # Whisper runs beside the face pass (waited for, also on error: no work of the plan outlives it).
    encoding = run.models.gpu.submit(p.features_of, p.mel)
    try:
        matrices, has_face = p.track.finish()
    finally:
        wait([encoding])
    log.info("%s: %d source frames, %d with a face", video, len(matrices), int(has_face.sum()))
    num_out, order = output_length(opts.loop_mode, len(matrices), p.audio_frames)
    fields = p.settled(num_out, encoding.result())
    return _told(Plan(video=video, audio=audio, options=opts, info=info, fps=p.fps, matrices=matrices,
                      has_face=has_face, order=order, chunk_size=run.models.num_frames, seconds=p.clock.seconds,
                      face_start=p.track.start, **{**fields, "sync_spans": tuple(fields["sync_spans"])}))


@torch.inference_mode()
def open_plan(video: Path, audio: Path, info: video_mod.VideoInfo, opts: RunOptions, run: RunContext) -> OpenPlan:
    """A plan whose pass 1 is left running, for the render to advance (``OpenPlan.chunk``); where the output's
    length is the video's (``cut_off``, ``silence``) it is settled on the way (``OpenLength``)."""
    p = _Planning(video, audio, info, opts, run)
    try:
        return _opened(p, video, audio, info, opts, run)
    except BaseException:  # the pass is open: stop its workers and its bar on the way out
        p.track.close(failed=True)
        raise


def _opened(p: _Planning, video: Path, audio: Path, info: video_mod.VideoInfo, opts: RunOptions,
            run: RunContext) -> OpenPlan:
    features = p.encode(p.mel)
    estimate = video_mod.expected_frames(info, p.fps)
    pending = None
    if opts.loop_mode in ("cut_off", "silence"):
        pending = OpenLength(opts.loop_mode, p.edits, video, p.fps, p.audio_frames, run.models.num_frames,
                             run.models.syncnet is not None,
                             p.wav, p.mel, features, p.features_of, p.encode, p.clock, estimate=estimate)
    # A pending length starts as the container's count: the render's progress total until the pass tells.
    sources = p.audio_frames if pending is None else max(estimate, 1)
    num_out, order = output_length(opts.loop_mode, sources, p.audio_frames)
    if pending is None:
        fields = p.settled(num_out, features)
    else:  # what a pending length has before it settles: its spans are added as they become certain
        fields = dict(num_out=num_out, wav=p.wav, features=features, blend=None, ranges=(), sync_spans=[])
    return OpenPlan(video=video, audio=audio, options=opts, info=info, fps=p.fps, order=order,
                    chunk_size=run.models.num_frames, seconds=p.clock.seconds, face_start=p.track.start,
                    track=p.track, pending=pending, edits=p.edits, **fields)


def close_plan(open: OpenPlan) -> Plan:
    """The Plan of an open one whose render is done: pass 1 tracked to the end and checked."""
    matrices, has_face = open.track.finish()
    return _told(Plan(video=open.video, audio=open.audio, options=open.options, info=open.info, fps=open.fps,
                      wav=open.wav, features=open.features, matrices=matrices, has_face=has_face,
                      num_out=open.num_out, order=open.order, chunk_size=open.chunk_size,
                      sync_spans=tuple(open.sync_spans), seconds=open.seconds, blend=open.blend, ranges=open.ranges,
                      face_start=open.face_start))


def _told(plan: Plan) -> Plan:
    """``plan``, once each range it edits nothing in (no face there) has been named in a warning."""
    for a, b in plan.faceless_ranges():
        log.warning("range %.2f-%.2f s shows no face: nothing is edited there", a, b)
    return plan


def _features(encoder: AudioEncoder, mel: torch.Tensor, rows: list[tuple[int, int]] | None) -> torch.Tensor:
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
