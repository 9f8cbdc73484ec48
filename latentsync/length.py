"""A plan whose pass 1 is still running (``OpenPlan``, the one live object of a run), and its output's length
where it is the video's (``cut_off``: the shorter of video and audio, ``silence``: the longer, the audio padded
with silence), while pass 1 is still finding it out.

``OpenLength`` hands out the chunks that every length still possible renders alike, so synthesis starts before the
pass ends, and settles the open plan once the length is known, as a plan made after the pass has it.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from latentsync import audio as audio_mod
from latentsync import video as video_mod
from latentsync.control import StageClock
from latentsync.options import RunOptions
from latentsync.syncscore import SYNC_BUDGET, SYNC_SPAN, sync_spans
from latentsync.timeline import (
    FADE_FRAMES,
    Chunk,
    Edits,
    chunk_at,
    edited,
    output_length,
    pad_with_silence,
    silence_length,
)
from latentsync.tracking import FaceTrack

log = logging.getLogger(__name__)


def scored_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sync spans of the edited frame spans ``spans`` (each sampled on its own)."""
    return [(a + s, a + e) for a, b in spans for s, e in sync_spans(b - a)]


# log_mel mirrors its input at each end, and its last frame sees samples mirrored from up to this many before the
# end: a pad of silence at least this long leaves every frame that sees the audio alike however long the pad is.
_MIRRORED = 1 + audio_mod.N_FFT // 2 - audio_mod.HOP_LENGTH
# Normalised log-mel by which the audio's loudest bin must beat every bin near its end for a ``silence`` pad to leave
# the windows before untouched: far above the rounding an STFT of another length adds, far below any real margin.
_MARGIN = 1e-3


@dataclass
class OpenPlan:
    """A plan whose pass 1 is still running: the Plan's fields as they stand, read by the render while ``track``
    grows (each chunk asks for the frames it shows: :meth:`chunk`) and, with a ``pending`` length, while it settles
    ``num_out``, ``wav``, ``features``, ``blend``, ``ranges`` and ``sync_spans`` (which only ever grow at the end).
    ``plan.close_plan`` makes the Plan of it once the render is done."""

    video: Path
    audio: Path
    options: RunOptions
    info: video_mod.VideoInfo
    fps: float
    order: str
    chunk_size: int
    seconds: dict[str, float]
    face_start: int
    track: FaceTrack
    pending: OpenLength | None  # None: the output's length is known (the audio's)
    edits: Edits | None
    num_out: int  # with a pending length, the container's estimate until it settles
    wav: np.ndarray
    features: np.ndarray
    blend: np.ndarray | None
    ranges: tuple[tuple[float, float], ...]
    sync_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_out / self.chunk_size)

    def chunk(self, index: int) -> Chunk | None:
        """Chunk ``index`` once pass 1 has tracked what it shows and, while the output's length is pending, once it
        is certain whatever that length turns out; None past the output's end."""
        size, track = self.chunk_size, self.track
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
        track.ensure((index + 1) * size + FADE_FRAMES)  # a face's fade at the chunk's end looks that far ahead
        track.check()
        return chunk_at(index, size, self.num_out, self.order, track.has_face, self.blend)


class OpenLength:
    """What settles a streamed plan whose output length is the video's: ``cut_off`` (the shorter of video and audio)
    and ``silence`` (the longer, the audio padded with silence), known once pass 1 ends or, for ``cut_off``,
    reaches the audio's length.

    Until then ``early`` hands out the chunks that every length still possible renders alike: their frames are
    tracked and shown as they are (so the chunk is whole), their weights, sync-span membership and (``silence``)
    Whisper rows do not depend on where the output ends. ``settle`` then fixes the length and what follows from it,
    as a plan made after the pass has it.
    """

    def __init__(self, mode: str, edits: Edits | None, video: Path, fps: float, audio_frames: int, size: int,
                 scored: bool, wav: np.ndarray, mel: torch.Tensor, features: np.ndarray,
                 features_of: Callable[[torch.Tensor], np.ndarray], encode: Callable[[torch.Tensor], np.ndarray],
                 clock: StageClock, *, estimate: int):
        self.mode, self.edits, self.video, self.fps, self.size = mode, edits, video, fps, size
        self.audio_frames, self.scored = audio_frames, scored
        self.wav, self.features = wav, features  # the audio's own samples and features (``cut_off``'s for good)
        # During the render the models' GPU thread runs the generation loop: Whisper runs where it is asked for.
        self.features_of = features_of
        self.rows = 0  # feature rows read by the chunks handed out so far
        self.clean = 0  # leading Whisper windows that no pad changes (``silence``)
        self.padded: tuple[int, np.ndarray, np.ndarray] | None = None  # (num_out, wav, features) of one pad
        if self.mode == "silence":
            with clock("audio"):
                self.clean = _clean_windows(wav, mel, audio_frames, fps)
            if estimate > audio_frames:
                # The container says the video is the longer: pad for its length now, on the GPU thread, as a plan
                # made after the pass would (the very features, when the estimate is right).
                self.padded = self._pad(estimate, encode)

    def known(self, track: FaceTrack) -> bool:
        """Whether pass 1 has told the output's length."""
        return track.ended or (self.mode == "cut_off" and len(track.matrices) >= self.audio_frames)

    def early(self, plan: OpenPlan, track: FaceTrack, index: int) -> Chunk | None:
        """Chunk ``index`` if every output length still possible renders it alike (None: not yet known)."""
        tracked, size = len(track.matrices), self.size
        start, stop = index * size, (index + 1) * size
        # Every length still possible is at least this: cut_off's the video's so far, silence's also the audio's.
        shortest = tracked if self.mode == "cut_off" else max(tracked, self.audio_frames)
        if stop + FADE_FRAMES > tracked:  # the faces' fades at the chunk's end are not known yet
            return None
        blend = None
        if self.edits is not None:
            # Only a range that begins past the output's end fades into the frames before it.
            if stop + FADE_FRAMES > shortest:
                return None
            blend = self.edits.blend(shortest, stop)
        prefix: list[tuple[int, int]] = []
        if self.scored:
            prefix, bound = _span_prefix(self.edits, shortest)
            if any(j >= bound and not any(a <= j < b for a, b in prefix) for j in range(start, stop)):
                return None
        if self.mode == "silence" and not self._features_ready(plan, tracked, stop):
            return None
        # Spans only ever grow at the end: the paste stage may be reading the list as it grows.
        plan.sync_spans.extend(prefix[len(plan.sync_spans):])
        return chunk_at(index, size, stop, plan.order, track.has_face, blend)

    def _features_ready(self, plan: OpenPlan, tracked: int, stop: int) -> bool:
        """Whether the Whisper rows that frames up to ``stop`` read are the same for every ``silence`` length still
        possible; if so ``plan.features`` holds them."""
        rows_per_window = audio_mod.N_FRAMES // 2
        last = round((stop - 1) * (audio_mod.FEATURES_PER_SECOND / self.fps)) + int(audio_mod.WINDOW_OFFSETS.max())
        windows = last // rows_per_window + 1
        if windows > self.clean:
            # Past the audio's end (and the video longer): each pad of at least ``tracked`` frames shares them.
            if tracked <= self.audio_frames or windows > _padded_windows(len(self.wav), tracked, self.fps):
                return False
            if self.padded is None or self.padded[0] < tracked:  # the estimate fell short: pad further
                self.padded = self._pad(2 * tracked, self.features_of)
            plan.features = self.padded[2]
        self.rows = max(self.rows, last + 1)
        return True

    def _pad(self, num_out: int, encode: Callable[[torch.Tensor], np.ndarray]
             ) -> tuple[int, np.ndarray, np.ndarray]:
        wav = pad_with_silence(self.wav, num_out, self.fps)
        return num_out, wav, encode(audio_mod.log_mel(wav))

    def settle(self, plan: OpenPlan, track: FaceTrack) -> None:
        """Fix the output's length and what follows from it (audio, features, blend, ranges, sync spans)."""
        track.check()
        num_out, _ = output_length(self.mode, len(track.matrices), self.audio_frames)
        wav, features = self.wav, self.features
        if num_out > self.audio_frames:
            if self.padded is not None and self.padded[0] == num_out:
                _, wav, features = self.padded
            else:
                wav = pad_with_silence(self.wav, num_out, self.fps)
                features = self.features_of(audio_mod.log_mel(wav))
        if not np.array_equal(features[:self.rows], plan.features[:self.rows]):  # never, if the reasoning holds
            log.warning("%s: the audio features the first chunks used differ from the padded audio's", self.video)
        log.info("%s: %d output frames at %.3f fps, loop mode %s", self.video, num_out, self.fps, self.mode)
        edit = edited(self.edits, num_out)
        scored = scored_spans(list(edit.spans)) if self.scored else []
        plan.num_out, plan.wav, plan.features, plan.blend, plan.ranges = num_out, wav, features, edit.blend, edit.ranges
        settled = plan.sync_spans
        if settled != scored[:len(settled)]:  # never, if the reasoning holds
            log.warning("%s: sync spans %s listed early are not those of the output", self.video, settled)
            settled.clear()
        settled.extend(scored[len(settled):])


def _span_prefix(edits: Edits | None, shortest: int) -> tuple[list[tuple[int, int]], float]:
    """The sync spans that every output of at least ``shortest`` frames lists first, and a frame before which no
    other span of any of those outputs begins (inf: none begins after them)."""
    end = math.inf  # without edits the one span is the whole output, wherever it ends
    prefix: list[tuple[int, int]] = []
    spans: Sequence[tuple[int, float]] = edits.spans if edits is not None else [(0, end)]
    for a, b in spans:
        if b <= shortest:  # the range ends inside every such output: its spans are known
            prefix += scored_spans([(a, int(b))])
        elif shortest - a > SYNC_SPAN:
            # Cut where the output ends: its first span is known; the others start at least a third (the most
            # spans there are, less one) of the way past it, of a length at least ``shortest - a``.
            prefix.append((a, a + SYNC_SPAN))
            return prefix, a + (shortest - a - SYNC_SPAN) // (SYNC_BUDGET // SYNC_SPAN - 1)
        else:
            return prefix, a
    return prefix, end


def _padded_windows(samples: int, shortest: int, fps: float) -> int:
    """Leading Whisper windows alike in the features of ``samples`` of audio padded with silence to any length of
    at least ``shortest`` frames: the whole STFT blocks of the shortest pad, once they hold every frame that has a
    sample of the audio (then the loudest bin, which scales the log-mel, is one of theirs)."""
    padded = silence_length(samples, shortest, fps)
    if padded - samples < _MIRRORED:
        return 0
    block = audio_mod._STFT_BLOCK  # log_mel's frames are made a block at a time
    whole = padded // audio_mod.HOP_LENGTH // block * block
    last = (samples + audio_mod.N_FFT // 2 - 1) // audio_mod.HOP_LENGTH  # the last frame with a sample of the audio
    return whole // audio_mod.N_FRAMES if whole > last else 0


def _clean_windows(wav: np.ndarray, mel: torch.Tensor, audio_frames: int, fps: float) -> int:
    """Leading Whisper windows of the audio's features that ``silence``'s pad, of whatever length, leaves alike.

    They are the whole STFT blocks of frames that hold only the audio's own samples (none mirrored at its end), so
    long as the loudest bin, which scales the whole log-mel, is one of theirs whatever the pad: it must beat by
    ``_MARGIN`` every later frame of the audio's own log-mel and of the audio's end padded as each pad too short to
    stop the mirroring would pad it, and as a long pad does (which stands for every longer one: silence after).
    """
    hop, half, block = audio_mod.HOP_LENGTH, audio_mod.N_FFT // 2, audio_mod._STFT_BLOCK
    if len(wav) < half:
        return 0
    own = (len(wav) - half) // hop + 1  # frames that hold only the audio's own samples
    head = own // block * block // audio_mod.N_FRAMES * audio_mod.N_FRAMES
    if head == 0:
        return 0
    loudest = mel[:, :head].max()
    if mel.shape[1] > head and not loudest - mel[:, head:].max() > _MARGIN:
        return 0
    pads = {2 * audio_mod.N_FFT}  # long enough that every frame with a sample of the audio sees only silence after
    for num_out in itertools.count(audio_frames + 1):
        pad = silence_length(len(wav), num_out, fps) - len(wav)
        if pad >= _MIRRORED:
            break
        if pad > 0:
            pads.add(pad)
    # A probe from two frames before ``head``: its frames from the third on are the audio's from ``head`` on.
    tail = wav[(head - 2) * hop:]
    for pad in sorted(pads):
        probe = audio_mod.log_mel(np.concatenate([tail, np.zeros(pad, np.float32)]))
        if not loudest - probe[:, 2:].max() > _MARGIN:
            return 0
    return head // audio_mod.N_FRAMES
