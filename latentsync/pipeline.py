"""The lip-sync pipeline: upstream LatentSync's maths, streamed so memory stays flat on long videos.

Two passes over the video, each a stream of frames:
1. *faces*: decode at the processing rate, track one face, compute upstream's smoothed affine matrix per frame
   (only the 2×3 matrices are kept, a few bytes a frame);
2. *synthesis*: for each 16-frame chunk of the output, fetch its source frames (forwards, or in reverse for ping-pong
   looping), re-crop them with the stored matrices, VAE-encode, denoise, decode, paste back, write to the encoder.
The user's own audio is muxed at the end, trimmed or padded to the output length.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from latentsync import audio as audio_mod
from latentsync import video as video_mod
from latentsync.align import FaceAligner, load_mask
from latentsync.config import config_path, load_config
from latentsync.errors import InputError
from latentsync.devices import pick_device, pick_dtype
from latentsync.face import FaceTracker
from latentsync.options import FACE_SELECTS, LOOP_MODES, RunOptions  # noqa: F401 — re-exported for callers
from latentsync.preflight import check_run_paths
from latentsync.sampling import denoise
from latentsync.weights import load_scheduler, load_unet, load_vae, unet_config_for

log = logging.getLogger(__name__)

UPSTREAM_FPS = 25.0
DEEPCACHE_INTERVAL = 3  # upstream's DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)
SYNC_RESOLUTION = 256  # SyncNet's crops
SYNC_SPAN, SYNC_BUDGET = 64, 256  # scored output frames: spans of 64, at most 256 in all
ACTIVE_SPEAKER_SECONDS = 5.0  # how much of the video the speaker is chosen on


class Cancelled(Exception):
    """The caller's cancel event was set; the run stopped between chunks and cleaned up."""


@dataclass
class LipSyncResult:
    """What a run produced: the mp4, the seed actually used, frame counts and seconds per stage."""

    output: Path
    seed: int
    frames: int
    frames_with_face: int
    fps: float
    seconds: dict[str, float] = field(default_factory=dict)
    sync: Any = None  # a SyncScore when SyncNet is loaded


def source_index(j: int, num_source: int, loop_mode: str) -> int:
    """Which source frame output frame ``j`` shows: upstream's ping-pong (``bounce``) or a plain restart (``loop``)."""
    if j < num_source:
        return j
    segment, offset = divmod(j, num_source)
    if loop_mode == "bounce" and segment % 2 == 1:
        return num_source - 1 - offset
    return offset


def nearest_with_face(has_face: list[bool]) -> list[int]:
    """For each position, the nearest position whose frame has the face (itself when it has one)."""
    have = [i for i, h in enumerate(has_face) if h]
    return [min(have, key=lambda k: (abs(k - i), k)) for i in range(len(has_face))]


class _FrameFetcher:
    """Serves source frames by index, reading forwards in one stream and re-seeking only when order breaks."""

    def __init__(self, path: Path, fps: float, info: video_mod.VideoInfo):
        self.path, self.fps, self.info = path, fps, info
        self._reader: Iterator[np.ndarray] | None = None
        self._next = 0

    def _open(self, start: int) -> None:
        self.close()
        self._reader = video_mod.read_frames(self.path, self.fps, start=start, info=self.info)
        self._next = start

    def get_range(self, first: int, last: int) -> list[np.ndarray]:
        """Frames ``first`` … ``last`` inclusive, in increasing order."""
        if self._reader is None or self._next != first:
            self._open(first)
        frames = []
        for _ in range(last - first + 1):
            frame = next(self._reader, None)
            if frame is None:
                raise RuntimeError(f"{self.path}: the video ended before frame {self._next}")
            frames.append(frame)
            self._next += 1
        return frames

    def get(self, indices: list[int]) -> dict[int, np.ndarray]:
        """The frames at ``indices`` (any order, repeats allowed), reading each contiguous run once."""
        wanted = sorted(set(indices))
        out: dict[int, np.ndarray] = {}
        run_start = prev = wanted[0]
        for idx in wanted[1:] + [None]:
            if idx is not None and idx == prev + 1:
                prev = idx
                continue
            out.update(zip(range(run_start, prev + 1), self.get_range(run_start, prev)))
            if idx is not None:
                run_start = prev = idx
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _Timer:
    """Accumulates wall seconds per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def _check_cancel(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("lip-sync cancelled")


class LipSync:
    """LatentSync with every model loaded once; call :meth:`lipsync` for each video."""

    def __init__(self, *, unet, vae, audio_encoder, scheduler, mask: torch.Tensor, resolution: int, num_frames: int,
                 device: torch.device, dtype: torch.dtype, syncnet=None, version: str | None = None):
        self.unet, self.vae, self.audio_encoder, self.scheduler = unet, vae, audio_encoder, scheduler
        self.mask = mask.to(device=device, dtype=dtype)
        self.resolution, self.num_frames = resolution, num_frames
        self.device, self.dtype = device, dtype
        self.syncnet = syncnet
        self.version = version

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, version: str = "1.6", device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, unet_config: str | Path | None = None,
                        syncnet_config: str | Path | None = None) -> "LipSync":
        """Load VAE, U-Net, Whisper (and SyncNet when present) from a folder laid out like upstream's ``checkpoints/``.

        ``unet_config`` defaults to the config of ``version``; its ``data.resolution`` must match the checkpoint
        (1.5 = 256 px, 1.6 = 512 px). ``syncnet_config`` defaults to the shipped StableSyncNet config.
        """
        weights_dir = Path(weights_dir)
        if not weights_dir.is_dir():
            raise InputError(f"weights folder not found: {weights_dir}")
        device = pick_device(device)
        dtype = pick_dtype(device, dtype)
        unet_config = unet_config or unet_config_for(version)
        cfg = load_config(unet_config)
        data = cfg.get("data", {})
        resolution = int(data.get("resolution", 256))
        num_frames = int(data.get("num_frames", 16))
        t0 = time.perf_counter()
        unet = load_unet(cfg["model"], weights_dir / "latentsync_unet.pt", device=device, dtype=dtype)
        vae = load_vae(weights_dir / "sd-vae-ft-mse", device=device, dtype=dtype)
        # Whisper runs in fp16 on CUDA as upstream does (its LayerNorms stay fp32 inside transformers), fp32 elsewhere.
        encoder = audio_mod.AudioEncoder.from_pretrained(weights_dir / "whisper" / "tiny.pt", device=device,
                                                         dtype=torch.float16 if device.type == "cuda" else torch.float32)
        mask = load_mask(weights_dir / "mask.png", resolution)
        syncnet = None
        syncnet_path = weights_dir / "stable_syncnet.pt"
        if syncnet_path.is_file():
            from latentsync.weights import load_syncnet

            syncnet_config = syncnet_config or config_path("syncnet/syncnet_16_pixel_attn.yaml")
            syncnet = load_syncnet(syncnet_config, syncnet_path, device=device, dtype=torch.float32)
        else:
            log.warning("no %s: results will carry no sync score", syncnet_path)
        log.info("loaded LatentSync %s (U-Net config %s, %d px, %s %s) in %.1f s", version, unet_config, resolution,
                 device, str(dtype).removeprefix("torch."), time.perf_counter() - t0)
        return cls(unet=unet, vae=vae, audio_encoder=encoder, scheduler=load_scheduler(), mask=mask,
                   resolution=resolution, num_frames=num_frames, device=device, dtype=dtype, syncnet=syncnet,
                   version=version)

    # ------------------------------------------------------------------------------------------------ public API
    @torch.inference_mode()
    def lipsync(self, video: str | Path, audio: str | Path, output: str | Path,
                options: RunOptions | dict[str, Any] | None = None, *, cancel: Any = None, progress: bool = False,
                **overrides: Any) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``.

        ``options`` is a :class:`RunOptions` (or a dict of its fields); keyword ``overrides`` name the same fields
        (``guidance_scale=``, ``seed=``, …). ``cancel`` is any object with ``is_set()`` (a ``threading.Event``);
        it is checked between chunks and denoising steps.
        """
        opts = RunOptions.make(options, **overrides).with_seed()
        check_run_paths(video, audio, output)  # before any model runs or frame is decoded: one InputError line
        video, audio, output = Path(video), Path(audio), Path(output)
        guidance_scale, inference_steps, seed = opts.guidance_scale, opts.inference_steps, opts.seed
        loop_mode, deepcache, keep_fps = opts.loop_mode, opts.deepcache, opts.keep_fps
        face_point, face_select = opts.face_point, opts.face_select
        timer = _Timer()
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="latentsync-") as tmp:
            with timer("probe"):
                info = video_mod.probe(video)
                wav = audio_mod.load_audio(audio)
            fps = info.fps if keep_fps else UPSTREAM_FPS
            if face_select == "active_speaker":
                with timer("active_speaker"):
                    face_point = self._active_speaker_point(video, fps, info)
            with timer("audio"):
                features = self.audio_encoder.features(wav)
            audio_frames = audio_mod.audio_frame_count(features, fps)
            # How many source frames matter: `silence` may use the whole video, other modes at most the audio's length.
            limit = None if loop_mode == "silence" else audio_frames
            with timer("faces"):
                matrices = self._track(video, fps, info, limit, face_point, cancel, progress)
            num_source = len(matrices)
            if num_source == 0:
                raise InputError(f"{video}: no video frames could be read")
            with_face = sum(m is not None for m in matrices)
            if with_face == 0:
                raise InputError(f"{video}: no face was found in any frame; LatentSync needs a visible, roughly "
                                 "frontal face")
            num_out, order = self._output_length(loop_mode, num_source, audio_frames)
            if num_out > audio_frames:
                # `silence` with a longer video: pad the audio so the mouth closes over the rest of the video.
                pad = int(math.ceil(num_out / fps * audio_mod.SAMPLE_RATE)) - len(wav)
                wav = np.concatenate([wav, np.zeros(max(pad, 0), dtype=np.float32)])
                with timer("audio"):
                    features = self.audio_encoder.features(wav)
            log.info("%s: %d output frames at %.3f fps from %d source frames (%d with a face), loop mode %s", video,
                     num_out, fps, num_source, with_face, loop_mode)
            silent = Path(tmp) / "video.mp4"
            sync_crops: dict[tuple[int, int], list[np.ndarray]] = {}
            self._synthesize(video, fps, info, matrices, features, num_out, order, silent, seed, guidance_scale,
                             inference_steps, deepcache, timer, cancel, progress, sync_crops)
            with timer("mux"):
                video_mod.mux_audio(silent, audio, output, duration=num_out / fps)
            sync = None
            if self.syncnet is not None:
                with timer("sync"):
                    sync = self._score(sync_crops, wav, fps)
        frames_with_face = sum(matrices[source_index(j, num_source, order)] is not None for j in range(num_out))
        result = LipSyncResult(output=output, seed=seed, frames=num_out, frames_with_face=frames_with_face, fps=fps,
                               seconds={k: round(v, 3) for k, v in timer.seconds.items()}, sync=sync)
        log.info("wrote %s: %d frames, %d with a face, seed %d, %s", output, num_out, frames_with_face, seed,
                 result.seconds)
        return result

    # ------------------------------------------------------------------------------------------------ stages
    @staticmethod
    def _output_length(loop_mode: str, num_source: int, audio_frames: int) -> tuple[int, str]:
        """Output frame count and the looping order used past the end of the video.

        ``bounce``/``loop``: the audio's length (upstream's rule), the video looped or cut to it. ``cut_off``: the
        shorter of the two. ``silence``: a longer video is kept whole (the audio padded with silence); a shorter one
        bounces, as by default.
        """
        order = "loop" if loop_mode == "loop" else "bounce"
        if loop_mode == "cut_off":
            return min(num_source, audio_frames), order
        if loop_mode == "silence":
            return max(num_source, audio_frames), order
        return audio_frames, order

    def _track(self, video, fps, info, limit, face_point, cancel, progress) -> list[np.ndarray | None]:
        """Pass 1: the smoothed affine matrix of the tracked face in every source frame (None where it is missing)."""
        tracker = FaceTracker(point=face_point)
        aligner = FaceAligner(self.resolution)
        matrices: list[np.ndarray | None] = []
        frames = video_mod.read_frames(video, fps, count=limit, info=info)
        try:
            for i, frame in enumerate(tqdm(frames, desc="faces", unit="frame", disable=not progress, total=limit)):
                if i % 16 == 0:
                    _check_cancel(cancel)
                face = tracker.track(frame)
                if face is None:
                    aligner.reset()  # upstream's p_bias smoothing restarts after a gap
                    matrices.append(None)
                    continue
                matrices.append(aligner.matrix(face.anchors))
        finally:
            frames.close()
        return matrices

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dist = self.vae.encode(pixels).latent_dist
        cfg = self.vae.config  # load_vae sets upstream's scaling 0.18215 and shift 0
        return (dist.sample(generator=generator) - cfg.shift_factor) * cfg.scaling_factor

    def _synthesize(self, video, fps, info, matrices, features, num_out, loop_mode, out_path, seed, guidance_scale,
                    inference_steps, deepcache, timer, cancel, progress, sync_crops) -> None:
        """Pass 2: chunk by chunk, generate the mouth region and stream the restored frames to the encoder."""
        num_source = len(matrices)
        R, f = self.resolution, self.num_frames
        generator = torch.Generator(self.device).manual_seed(seed)
        # One noise draw for the whole video, shared by every frame (upstream, spec §5.7), drawn before any chunk.
        noise = torch.randn((1, 4, 1, R // 8, R // 8), generator=generator, device=self.device, dtype=self.dtype)
        aligner = FaceAligner(self.resolution, device=self.device)  # warps run where the model runs
        mask = self.mask  # (1, R, R), 1 = keep
        fetcher = _FrameFetcher(video, fps, info)
        writer = video_mod.VideoWriter(out_path, fps, info.width, info.height)
        segments = self._sync_segments(num_out)
        try:
            bar = tqdm(total=num_out, desc="lip-sync", unit="frame", disable=not progress)
            for start in range(0, num_out, f):
                _check_cancel(cancel)
                stop = min(start + f, num_out)
                src = [source_index(j, num_source, loop_mode) for j in range(start, stop)]
                with timer("read"):
                    frames = fetcher.get(src)
                mats = [matrices[s] for s in src]
                has_face = [m is not None for m in mats]
                if not any(has_face):
                    with timer("encode"):
                        for s in src:
                            writer.write(frames[s])
                    bar.update(len(src))
                    continue
                with timer("align"):
                    # The model sees 16 frames at once; frames without the face borrow the nearest crop that has it.
                    crops = {}
                    for k, s in enumerate(src):
                        if has_face[k] and s not in crops:
                            crops[s] = aligner.warp(frames[s], mats[k])
                    fill = nearest_with_face(has_face)
                    faces = np.stack([crops[src[fill[k]]] for k in range(len(src))])
                    pixels = torch.from_numpy(faces).to(self.device).permute(0, 3, 1, 2).float()
                    pixels = (pixels / 127.5 - 1).to(self.dtype)  # scaled in fp32, then cast, as upstream
                    masked = pixels * mask
                    mask_lat = F.interpolate(mask.expand(len(src), 1, R, R), size=(R // 8, R // 8))
                with timer("vae_encode"):
                    masked_lat = self._encode(masked, generator)
                    ref_lat = self._encode(pixels, generator)
                audio_embeds = audio_mod.audio_windows(features, start, stop, fps).to(self.device, self.dtype)
                with timer("denoise"):
                    latents = denoise(
                        self.unet, self.scheduler, noise.expand(-1, -1, len(src), -1, -1).clone(),
                        _to_5d(mask_lat), _to_5d(masked_lat), _to_5d(ref_lat), audio_embeds,
                        guidance_scale=guidance_scale, num_inference_steps=inference_steps,
                        deepcache_interval=DEEPCACHE_INTERVAL if deepcache else 0,
                        step_callback=lambda _: _check_cancel(cancel))
                with timer("vae_decode"):
                    lat = latents[0].permute(1, 0, 2, 3)  # (f, 4, h, w)
                    vae_cfg = self.vae.config
                    decoded = self.vae.decode(lat / vae_cfg.scaling_factor + vae_cfg.shift_factor).sample
                    # Outside the mouth mask the original aligned pixels come back exactly (upstream §5.10).
                    decoded = decoded * (1 - mask) + pixels * mask
                with timer("restore"):
                    for k, s in enumerate(src):
                        frame = frames[s]
                        if has_face[k]:
                            frame = aligner.restore(frame, decoded[k], mats[k])
                        for seg in segments:
                            if seg[0] <= start + k < seg[1]:
                                sync_crops.setdefault(seg, []).append(self._sync_crop(decoded[k]))
                        with timer("encode"):
                            writer.write(frame)
                bar.update(len(src))
            bar.close()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            fetcher.close()

    # ------------------------------------------------------------------------------------------------ sync scoring
    def _sync_segments(self, num_out: int) -> list[tuple[int, int]]:
        """Output-frame spans whose generated crops are scored: a fixed budget spread over the video.

        Scoring every frame would keep every crop; a few evenly spaced spans bound both the memory and the cost
        (under 0.1 % of the U-Net's work) while sampling the whole video.
        """
        if self.syncnet is None:
            return []
        span, budget = SYNC_SPAN, SYNC_BUDGET
        if num_out <= span:
            return [(0, num_out)]
        # Spans of equal length whatever the video's length, so scoring costs the same memory for every video.
        count = min(budget // span, math.ceil(num_out / span))
        starts = np.linspace(0, num_out - span, count).round().astype(int)
        return [(int(s), int(s) + span) for s in starts]

    def _sync_crop(self, face: torch.Tensor) -> np.ndarray:
        """A generated face in [−1, 1] as the 256-px uint8 crop SyncNet was trained on."""
        x = ((face.float().clamp(-1, 1) + 1) * 127.5)[None]
        if x.shape[-1] != SYNC_RESOLUTION:
            x = F.interpolate(x, size=(SYNC_RESOLUTION, SYNC_RESOLUTION), mode="area")
        return x[0].round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def _score(self, crops: dict[tuple[int, int], list[np.ndarray]], wav: np.ndarray, fps: float):
        """SyncNet agreement of the generated mouths with the audio, over the sampled spans."""
        from latentsync.syncscore import SyncScorer, combine_scores

        scorer = SyncScorer(self.syncnet, fps=fps)
        scores = []
        for (start, stop), frames in crops.items():
            if len(frames) < stop - start or len(frames) < scorer.window_frames * fps / UPSTREAM_FPS:
                continue
            a = int(round(start / fps * audio_mod.SAMPLE_RATE))
            b = int(round(stop / fps * audio_mod.SAMPLE_RATE))
            scores.append(scorer(np.stack(frames), wav[a:b]))
        if not scores:
            log.info("output too short to score its sync (SyncNet needs %d frames)", scorer.window_frames)
            return None
        return combine_scores(scores)

    def _active_speaker_point(self, video: Path, fps: float, info) -> tuple[float, float] | None:
        """Score every face of the first seconds against the video's own audio; the speaker's box centre."""
        from latentsync.face import FaceLandmarker
        from latentsync.syncscore import SyncScorer, choose_active_speaker

        if self.syncnet is None:
            raise InputError("face_select='active_speaker' needs stable_syncnet.pt in the weights folder")
        if not info.has_audio:
            log.warning("%s has no audio track to find the speaker by; editing the largest face", video)
            return None
        wav = audio_mod.load_audio(video)
        landmarker = FaceLandmarker()
        trackers: list[FaceTracker] = []
        aligners: list[FaceAligner] = []
        tracks: list[list[np.ndarray]] = []
        first_boxes: list[tuple[float, float]] = []
        skipped = 0
        frames = video_mod.read_frames(video, fps, count=int(round(ACTIVE_SPEAKER_SECONDS * fps)), info=info)
        try:
            for frame in frames:
                if not trackers:
                    faces = landmarker.detect(frame)
                    if not faces:
                        skipped += 1
                        continue
                    if len(faces) == 1:
                        log.info("active speaker: one face in %s, nothing to choose", video)
                        return None
                    for face in faces:
                        centre = ((face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2)
                        trackers.append(FaceTracker(landmarker=landmarker, point=centre))
                        aligners.append(FaceAligner(SYNC_RESOLUTION))
                        tracks.append([])
                        first_boxes.append(centre)
                for tracker, aligner, track in zip(trackers, aligners, tracks):
                    face = tracker.track(frame)
                    if face is None:
                        aligner.reset()
                        if track:  # a missing frame repeats the last crop, so every track covers the same frames
                            track.append(track[-1])
                        continue
                    crop, _ = aligner.align(frame, face.anchors)
                    track.append(crop)
        finally:
            frames.close()
        if not trackers:
            return None
        # Every track ends on the last frame read; keep the span they all cover.
        total = max(len(t) for t in tracks)
        n = min(len(t) for t in tracks)
        tracks = [np.stack(t[len(t) - n:]) for t in tracks]
        if n < 16 * fps / UPSTREAM_FPS:
            log.warning("active speaker: too few frames with every face to compare; editing the largest face")
            return None
        first = skipped + total - n
        wav = wav[int(round(first / fps * audio_mod.SAMPLE_RATE)):]
        best = choose_active_speaker(tracks, wav, SyncScorer(self.syncnet, fps=fps))
        return first_boxes[best]


def _to_5d(x: torch.Tensor) -> torch.Tensor:
    """``(f, c, h, w)`` → ``(1, c, f, h, w)``, the U-Net's layout."""
    return x.permute(1, 0, 2, 3).unsqueeze(0)
