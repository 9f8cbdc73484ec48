"""Lip-sync scoring with StableSyncNet, and choosing the speaking face among several tracked faces.

Inputs are what the pipeline already has: aligned face crops (uint8, N×R×R×3, RGB, R = 256 or 512) and the
16 kHz mono audio that goes with them. Windows follow how upstream trained the network: 16 consecutive 25 fps
frames, lower half of the 256-px crop, stacked on channels, against the 52 Wav2Lip-mel frames that start at
mel index ``int(80 · frame / 25)`` (16 kHz / hop 200 = 80 mel frames per second, 3.2 per video frame).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from latentsync.audio import SAMPLE_RATE, wav2lip_mel
from latentsync.devices import upload
from latentsync.models.syncnet import VIDEO_FPS, StableSyncNet

log = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

MEL_FPS = 80.0  # Wav2Lip mel frames per second: 16 kHz, hop 200
RESOLUTION = 256  # aligned-face size SyncNet was trained on; the lower half is its input


@dataclass(frozen=True)
class SyncScore:
    """How well a face track's mouth agrees with the audio.

    ``mean_cosines[i]`` is the cosine of the SyncNet embeddings averaged over ``windows`` 16-frame windows with
    the audio taken ``offsets[i]`` frames later than the video (negative: earlier). ``best_offset`` > 0 means the
    mouth moves ahead of the sound. ``confidence`` = best − median over offsets (the SyncNet convention, here
    with cosines, so higher is better; ≈ 0 for a face that is not speaking the audio).
    """

    offset0_cosine: float
    best_offset: int
    confidence: float
    windows: int
    offsets: tuple[int, ...] = ()
    mean_cosines: tuple[float, ...] = ()


class ScoreFn(Protocol):
    """Anything that scores aligned crops (N, R, R, 3) uint8 against 16 kHz mono float32 audio."""

    def __call__(self, crops: np.ndarray, wav: np.ndarray) -> SyncScore: ...


@lru_cache(maxsize=1)
def _silence_mel_value() -> float:
    # Pad audio windows that run past the ends of the file with what the mel of silence is, not with 0
    # (0 is mid-scale in the normalised mel, i.e. loud).
    return float(wav2lip_mel(np.zeros(3200, dtype=np.float32)).min())


def _mel_start(frame: int) -> int:
    """First mel frame of the window of video frame ``frame`` at 25 fps, as upstream's dataset computes it."""
    return math.floor(MEL_FPS * (frame / VIDEO_FPS))


def _to_25fps(crops: np.ndarray, fps: float) -> np.ndarray:
    """Pick, for each 25 fps timestamp, the frame on screen at that time."""
    if abs(fps - VIDEO_FPS) < 1e-6:
        return crops
    n_out = int(math.floor(len(crops) * VIDEO_FPS / fps + 1e-9))
    idx = np.minimum(np.floor(np.arange(n_out) * (fps / VIDEO_FPS) + 1e-9).astype(np.int64), len(crops) - 1)
    return crops[idx]


class SyncScorer:
    """``ScoreFn`` backed by a StableSyncNet (any device and dtype; batches windows)."""

    def __init__(
        self,
        model: StableSyncNet,
        *,
        max_offset: int = 5,
        stride: int = 8,
        fps: float = VIDEO_FPS,
        batch_size: int = 16,
    ):
        if max_offset < 0 or stride < 1 or batch_size < 1 or fps <= 0:
            raise ValueError(f"bad scorer settings: {max_offset=}, {stride=}, {batch_size=}, {fps=}")
        self.model = model.eval()
        self.max_offset = max_offset
        self.stride = stride
        self.fps = fps
        self.batch_size = batch_size
        self.window_frames = model.config.visual_encoder.in_channels // 3
        self.mel_window = math.ceil(self.window_frames * MEL_FPS / VIDEO_FPS)  # 16 frames → 52

    def _starts(self, n_frames: int, n_mel: int) -> tuple[list[int], bool]:
        """Window start frames, and whether the mel needs padding (only for clips too short otherwise)."""
        k = self.max_offset
        last = n_frames - self.window_frames
        while last >= k and _mel_start(last + k) + self.mel_window > n_mel:
            last -= 1
        if last >= k:  # every window sees real audio at every offset
            return list(range(k, last + 1, self.stride)), False
        return list(range(0, n_frames - self.window_frames + 1, self.stride)), True

    def _visual_batch(self, crops: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """(len(starts), 3·16, 128, 256) in [−1, 1]: the lower halves of each window's frames, stacked."""
        p = next(self.model.parameters())
        frames = torch.stack([crops[s : s + self.window_frames] for s in starts])  # (b, f, R, R, 3) uint8
        b, f, r = frames.shape[:3]
        x = upload(frames, p.device).permute(0, 1, 4, 2, 3).reshape(b * f, 3, r, r).float()
        if r != RESOLUTION:  # a 512 model's crops: SyncNet only knows 256
            # area averaging = cv2.INTER_AREA for the 512 → 256 halving; rounded as a uint8 image would be
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area").round()
        x = x[:, :, RESOLUTION // 2 :, :] / 127.5 - 1.0
        return x.reshape(b, f * 3, RESOLUTION // 2, RESOLUTION).to(p.dtype)

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray, wav: np.ndarray) -> SyncScore:
        """Score one face track; needs at least 16 frames (0.64 s at 25 fps)."""
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
            raise ValueError(f"crops must be uint8 (N, R, R, 3), got {crops.dtype} {crops.shape}")
        crops = _to_25fps(crops, self.fps)
        if len(crops) < self.window_frames:
            raise ValueError(f"{len(crops)} frames at 25 fps: at least {self.window_frames} are needed to score sync")
        p = next(self.model.parameters())
        mel = torch.from_numpy(np.ascontiguousarray(wav2lip_mel(np.asarray(wav, dtype=np.float32))))
        k, n_mel = self.max_offset, mel.shape[1]
        starts, padded = self._starts(len(crops), n_mel)
        if padded:
            log.debug("clip too short for %d-frame offsets on real audio only; padding the mel with silence", k)
        left = max(0, -_mel_start(-k))
        right = max(0, _mel_start(starts[-1] + k) + self.mel_window - n_mel)
        mel = upload(F.pad(mel, (left, right), value=_silence_mel_value()), p.device)

        offsets = list(range(-k, k + 1))
        # windows overlap in audio (stride < 2k+1): embed each distinct audio frame once
        audio_frames = sorted({s + o for s in starts for o in offsets})
        row = {j: i for i, j in enumerate(audio_frames)}
        audio = []
        for i in range(0, len(audio_frames), 4 * self.batch_size):
            chunk = audio_frames[i : i + 4 * self.batch_size]
            m = torch.stack([mel[:, left + _mel_start(j) : left + _mel_start(j) + self.mel_window] for j in chunk])
            audio.append(self.model.encode_audio(m[:, None].to(p.dtype)).float())
        audio_emb = torch.cat(audio)

        crops_t = torch.from_numpy(np.ascontiguousarray(crops))
        visual = []
        for i in range(0, len(starts), self.batch_size):
            batch = self._visual_batch(crops_t, starts[i : i + self.batch_size])
            visual.append(self.model.encode_visual(batch).float())
        visual_emb = torch.cat(visual)  # (W, C)

        idx = upload(torch.tensor([[row[s + o] for o in offsets] for s in starts]), audio_emb.device)
        cos = (visual_emb[:, None, :] * audio_emb[idx]).sum(-1)  # (W, offsets)
        mean = cos.mean(0).cpu().double().numpy()
        best = int(mean.argmax())
        return SyncScore(
            offset0_cosine=float(mean[k]),
            best_offset=offsets[best],
            confidence=float(mean[best] - np.median(mean)),
            windows=len(starts),
            offsets=tuple(offsets),
            mean_cosines=tuple(float(c) for c in mean),
        )


def choose_active_speaker(tracks: Sequence[np.ndarray], wav: np.ndarray, scorer: ScoreFn) -> int:
    """Index of the face whose mouth best follows the audio: highest sync confidence, then offset-0 cosine.

    Confidence (peak over offsets above the median) rather than the raw cosine, because a silent face can still
    have a middling cosine at every offset, while only the speaker's shows a peak; it also tolerates a small A/V
    offset in the source. ``tracks``: per face, aligned crops over the same frames.
    """
    if not tracks:
        raise ValueError("no face tracks to choose from")
    if len({len(t) for t in tracks}) != 1:
        raise ValueError(f"face tracks must cover the same frames, got lengths {[len(t) for t in tracks]}")
    if len(tracks) == 1:
        return 0
    scores = [scorer(t, wav) for t in tracks]
    best = max(range(len(scores)), key=lambda i: (scores[i].confidence, scores[i].offset0_cosine))
    others = ", ".join(
        f"face {i}: confidence {s.confidence:.3f}, cosine {s.offset0_cosine:.3f}"
        for i, s in enumerate(scores)
        if i != best
    )
    s = scores[best]
    log.info(
        "active speaker: face %d of %d (sync confidence %.3f, offset-0 cosine %.3f, best offset %+d frames, "
        "%d windows); %s",
        best, len(tracks), s.confidence, s.offset0_cosine, s.best_offset, s.windows, others,
    )
    return best


def combine_scores(scores: Sequence[SyncScore]) -> SyncScore:
    """One score for several scored spans of a video: per-offset cosines averaged, weighted by window count."""
    if not scores:
        raise ValueError("no scores to combine")
    offsets = scores[0].offsets
    if any(s.offsets != offsets for s in scores):
        raise ValueError("scores over different offsets cannot be combined")
    weights = np.array([s.windows for s in scores], dtype=np.float64)
    mean = (np.array([s.mean_cosines for s in scores]) * weights[:, None]).sum(0) / weights.sum()
    best = int(mean.argmax())
    return SyncScore(
        offset0_cosine=float(mean[offsets.index(0)]),
        best_offset=offsets[best],
        confidence=float(mean[best] - np.median(mean)),
        windows=int(weights.sum()),
        offsets=offsets,
        mean_cosines=tuple(float(c) for c in mean),
    )


# ------------------------------------------------------------------------------- sampled spans of a pipeline run
SYNC_SPAN, SYNC_BUDGET = 64, 256  # scored output frames: spans of 64, at most 256 in all


def sync_spans(num_out: int) -> list[tuple[int, int]]:
    """Output-frame spans whose generated crops are scored: a fixed budget spread over the video.

    Scoring every frame would keep every crop; a few evenly spaced spans bound both the memory and the cost
    (under 0.1 % of the U-Net's work) while sampling the whole video.
    """
    if num_out <= SYNC_SPAN:
        return [(0, num_out)]
    # Spans of equal length whatever the video's length, so scoring costs the same memory for every video.
    count = min(SYNC_BUDGET // SYNC_SPAN, math.ceil(num_out / SYNC_SPAN))
    starts = np.linspace(0, num_out - SYNC_SPAN, count).round().astype(int)
    return [(int(s), int(s) + SYNC_SPAN) for s in starts]


def sync_crop(faces: torch.Tensor) -> np.ndarray:
    """Generated faces (n, 3, R, R) in [−1, 1] as the (n, 256, 256, 3) uint8 crops SyncNet was trained on."""
    x = (faces.float().clamp(-1, 1) + 1) * 127.5
    if x.shape[-1] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def score_span(model: StableSyncNet, span: tuple[int, int], crops: dict[int, np.ndarray], wav: np.ndarray,
               fps: float) -> SyncScore | None:
    """SyncNet agreement of the generated mouths of output frames ``span`` (``crops``: frame → crop) with the
    audio; None when a crop is missing or the span is shorter than SyncNet's window."""
    start, stop = span
    scorer = SyncScorer(model, fps=fps)
    if any(j not in crops for j in range(start, stop)) or stop - start < scorer.window_frames * fps / VIDEO_FPS:
        return None
    a = int(round(start / fps * SAMPLE_RATE))
    b = int(round(stop / fps * SAMPLE_RATE))
    return scorer(np.stack([crops[j] for j in range(start, stop)]), wav[a:b])


def pin_flat(module: ModuleT) -> ModuleT:
    """``module`` with every parameter and buffer a view of one pinned CPU buffer per dtype (``module.pinned_flat``):
    one fast copy up per scoring (:func:`syncnet_on`), and pinned memory the size of the weights (pinning each
    tensor on its own rounds every block up, up to twice the size)."""
    state = module.state_dict(keep_vars=True)
    flats: dict[torch.dtype, torch.Tensor] = {}
    module.pinned_flat = flats  # type: ignore[assignment]  # torch types Module attributes as tensors or modules
    for dtype in {t.dtype for t in state.values()}:
        group = [t for t in state.values() if t.dtype == dtype]
        flat = torch.empty(sum(t.numel() for t in group), dtype=dtype).pin_memory()
        offset = 0
        for t in group:
            view = flat[offset:offset + t.numel()].view(t.shape)
            view.copy_(t)
            t.data = view  # CPU to CPU: the tensor keeps its place in the module
            offset += t.numel()
        flats[dtype] = flat
    return module


@contextmanager
def syncnet_on(syncnet: StableSyncNet | None, device: torch.device) -> Iterator[StableSyncNet | None]:
    """SyncNet on ``device`` while it scores. One kept on the GPU (``loader.place_syncnet``) or used on the CPU is
    used as it is; one waiting in pinned CPU memory (:func:`pin_flat`) goes up in one copy per buffer, as a twin
    that is dropped after, and the cache is given back: the GPU's memory is the U-Net's, nothing comes back."""
    if syncnet is None or device.type != "cuda" or next(syncnet.parameters()).device == device:
        yield syncnet
        return
    flats = getattr(syncnet, "pinned_flat", {})
    up = {dtype: flat.to(device, non_blocking=True) for dtype, flat in flats.items()}
    on_device = {}
    for key, t in syncnet.state_dict().items():
        flat = flats.get(t.dtype)
        if flat is not None and t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
            on_device[key] = up[t.dtype][t.storage_offset():t.storage_offset() + t.numel()].view(t.shape)
        else:  # not one of the flat buffers' views: on its own
            on_device[key] = t.to(device, non_blocking=True)
    with torch.device("meta"):
        twin = type(syncnet).from_config(syncnet.config)
    twin.load_state_dict(on_device, strict=True, assign=True)
    try:
        yield twin.eval().requires_grad_(False)
    finally:
        del twin, on_device, up
        torch.cuda.empty_cache()
