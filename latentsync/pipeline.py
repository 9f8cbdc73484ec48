"""The lip-sync pipeline: upstream LatentSync's maths, streamed so memory stays flat on long videos.

A run is ``plan`` → ``render`` → ``finish``:
1. *plan*: probe, audio features, pass 1 over the video (``tracking``: one face followed, only its smoothed 2×3
   matrix kept per frame; Whisper runs beside it), the output's length and frame order, the sync spans;
2. *render*: for each 16-frame chunk of the output, fetch and align its frames, VAE-encode, denoise, decode,
   paste back and encode, score the sync of sampled spans; the stages (``crops``, ``generate``, ``paste``,
   ``scoring``) run concurrently in threads joined by bounded queues (``stages``);
3. *finish*: join the rendered parts, mux the user's own audio, score the sync.
Rendering is split into chunk ranges so that several workers can render parts of one video (issue 12).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsync import audio as audio_mod
from latentsync import media
from latentsync import video as video_mod
from latentsync.crops import AlignStage
from latentsync.devices import pick_device, pick_dtype
from latentsync.errors import InputError
from latentsync.face import FaceLandmarker, no_face_message
from latentsync.facepool import FacePool, default_workers
from latentsync.generate import GenerateStage
from latentsync.loader import compile_unet, load_models
from latentsync.options import FACE_SELECTS, LOOP_MODES, OUTPUT_FPS, RunOptions  # noqa: F401 — re-exported for callers
from latentsync.preflight import check_run_paths
from latentsync.paste import PasteStage
from latentsync.plan import LipSyncResult, Plan, RenderPart
from latentsync.scoring import ScoreStage
from latentsync.stages import Cancelled, StageClock, run_stages  # noqa: F401 — Cancelled re-exported
from latentsync.timeline import Chunk, chunk_at, nearest_with_face, output_length, source_index  # noqa: F401
from latentsync.tracking import FaceTrack

log = logging.getLogger(__name__)



class LipSync:
    """LatentSync with every model loaded once; call :meth:`lipsync` for each video.

    ``serial = True`` runs the synthesis stages one after another instead of concurrently (same frames);
    ``frame_tap(j, frame)``, when set, sees each output frame before it is encoded.
    """

    serial = False
    frame_tap = None

    def __init__(self, *, unet, vae, audio_encoder, scheduler, mask: torch.Tensor, resolution: int, num_frames: int,
                 device: torch.device, dtype: torch.dtype, syncnet=None, version: str | None = None,
                 face_workers: int = 0, caps: media.MediaCaps | None = None):
        self.unet, self.vae, self.audio_encoder, self.scheduler = unet, vae, audio_encoder, scheduler
        self.mask = mask.to(device=device, dtype=dtype)
        self.resolution, self.num_frames = resolution, num_frames
        self.device, self.dtype = device, dtype
        self.syncnet = syncnet
        self.version = version
        self.face_workers = int(face_workers)
        self.caps = caps or media.MediaCaps()  # the deployment's limits on input size and duration
        self._face_pool: FacePool | None = None
        self._face_landmarker: FaceLandmarker | None = None

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, version: str = "1.6", device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, unet_config: str | Path | None = None,
                        syncnet_config: str | Path | None = None, *, compile: bool = False,
                        face_workers: int | None = None, caps: media.MediaCaps | None = None) -> "LipSync":
        """Load VAE, U-Net, Whisper (and SyncNet when present) from a folder laid out like upstream's ``checkpoints/``.

        ``unet_config`` defaults to the config of ``version``; its ``data.resolution`` must match the checkpoint
        (1.5 = 256 px, 1.6 = 512 px). ``syncnet_config`` defaults to the shipped StableSyncNet config.
        ``compile=True`` compiles the U-Net's full and shallow passes and warms them up here (minutes the first
        time; cached next to the weights). ``face_workers``: face-detection processes (None: by core count).
        """
        device = pick_device(device)
        models = load_models(Path(weights_dir), version, device, pick_dtype(device, dtype), unet_config,
                             syncnet_config)
        if compile:
            compile_unet(models, Path(weights_dir))
        return cls(**models, face_workers=default_workers() if face_workers is None else face_workers, caps=caps)

    def close(self) -> None:
        """Stop the face-detection workers and free the detector (workers are also stopped at exit)."""
        if self._face_pool is not None:
            self._face_pool.close()
            self._face_pool = None
        if self._face_landmarker is not None:
            self._face_landmarker.close()
            self._face_landmarker = None

    def _detectors(self) -> tuple[FacePool | None, FaceLandmarker | None]:
        """The face-detection workers, or the in-process detector: made at the first run and kept (building
        mediapipe's graphs takes a moment), the workers again after an error or a cancel terminated them."""
        if self.face_workers > 0 and (self._face_pool is None or not self._face_pool.alive):
            self._face_pool = FacePool(self.face_workers)
        if self.face_workers == 0 and self._face_landmarker is None:
            self._face_landmarker = FaceLandmarker()
        return self._face_pool, self._face_landmarker

    # ------------------------------------------------------------------------------------------------ public API
    def lipsync(self, video: str | Path, audio: str | Path, output: str | Path,
                options: RunOptions | dict[str, Any] | None = None, *, cancel: Any = None, progress: bool = False,
                **overrides: Any) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``: ``plan`` → ``render`` → ``finish``.

        ``options`` is a :class:`RunOptions` (or a dict of its fields); keyword ``overrides`` name the same fields
        (``guidance_scale=``, ``seed=``, …). ``cancel`` is any object with ``is_set()`` (a ``threading.Event``);
        it is checked between chunks and denoising steps.
        """
        t0 = time.perf_counter()
        opts = RunOptions.make(options, **overrides).with_seed()
        check_run_paths(video, audio, output)  # before any model runs or frame is decoded: one InputError line
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        # With `bounce`/`loop` the output's length is the audio's, so synthesis need not wait for pass 1 to end.
        plan, track = self._plan(video, audio, opts, cancel, progress, stream=opts.loop_mode in ("bounce", "loop"))
        try:
            with tempfile.TemporaryDirectory(prefix="latentsync-") as tmp:
                part = self._render(plan, Path(tmp) / "video.mp4", None, cancel, progress, track)
                if track is not None:
                    track.ensure(math.inf)
                    _check_track(plan.video, track, plan.info)
                    track.close()
                    matrices, has_face = track.arrays()
                    plan = dataclasses.replace(plan, matrices=matrices, has_face=has_face)
                result = self.finish(plan, [part.path], output, [part])
        except BaseException:
            if track is not None:
                track.close(failed=True)
            raise
        result.seconds["wall"] = round(time.perf_counter() - t0, 3)
        log.info("wrote %s: %d frames, %d with a face, seed %d, %s", output, result.frames, result.frames_with_face,
                 result.seed, result.seconds)
        return result

    def plan(self, video: str | Path, audio: str | Path, options: RunOptions, *, cancel: Any = None,
             progress: bool = False) -> Plan:
        """Decide the run: probe, audio features, face pass 1 (matrices), output length and order, sync spans.

        Raises ``InputError`` for unusable inputs (no frames, no face anywhere) before any frame is generated.
        ``options`` without a seed gets a random one here; the plan carries it, so every ``render`` of the plan
        makes the same random draws.
        """
        return self._plan(video, audio, options, cancel, progress, stream=False)[0]

    @torch.inference_mode()
    def _plan(self, video: str | Path, audio: str | Path, options: RunOptions, cancel: Any, progress: bool,
              stream: bool) -> tuple[Plan, FaceTrack | None]:
        """``plan``; with ``stream`` (output length = the audio's) pass 1 is left running: the plan's matrices
        are the open track's growing lists, and the track is returned for ``_render`` to advance."""
        video, audio, opts = Path(video), Path(audio), options.with_seed()
        clock = StageClock()
        with clock("probe"):
            info = video_mod.probe(video, max_side=self.caps.max_side, max_duration=self.caps.max_duration)
            wav = audio_mod.load_audio(audio, max_duration=self.caps.max_duration)
        fps = info.fps if opts.keep_fps else OUTPUT_FPS
        face_point = opts.face_point
        if opts.face_select == "active_speaker":
            from latentsync.speaker import active_speaker_point

            with clock("active_speaker"):
                with self._syncnet_on_device() as syncnet:
                    face_point = active_speaker_point(syncnet, video, fps, info, self.caps.max_duration)
        with clock("audio"):
            mel = audio_mod.log_mel(wav)
        # The features have M // 2 rows for M mel frames: the face pass needs only that count.
        audio_frames = audio_mod.audio_frame_count(torch.empty((mel.shape[1] // 2, 0, 0)), fps)
        # How many source frames matter: `silence` may use the whole video, other modes at most the audio's length.
        limit = None if opts.loop_mode == "silence" else audio_frames
        with clock("faces"):
            pool, landmarker = self._detectors()
        if stream:
            features = self._features(mel, clock)
        track = FaceTrack(video, fps, info, limit, face_point, self.resolution, clock=clock, pool=pool,
                          landmarker=landmarker, cancel=cancel, progress=progress)
        if stream:
            num_out, order = output_length(opts.loop_mode, audio_frames, audio_frames)
            matrices, has_face = track.matrices, track.has_face
        else:
            try:  # Whisper runs beside the face pass (waited for, also on error: no thread outlives the plan)
                with ThreadPoolExecutor(1, thread_name_prefix="latentsync-audio") as audio_thread:
                    encoding = audio_thread.submit(self._features, mel, clock)
                    track.ensure(math.inf)
                    features = encoding.result()
                _check_track(video, track, info)
            except BaseException:
                track.close(failed=True)
                raise
            track.close()
            matrices, has_face = track.arrays()
            num_out, order = output_length(opts.loop_mode, len(matrices), audio_frames)
            log.info("%s: %d source frames, %d with a face", video, len(matrices), int(has_face.sum()))
        if num_out > audio_frames:
            # `silence` with a longer video: pad the audio so the mouth closes over the rest of the video.
            pad = int(math.ceil(num_out / fps * audio_mod.SAMPLE_RATE)) - len(wav)
            wav = np.concatenate([wav, np.zeros(max(pad, 0), dtype=np.float32)])
            features = self._features(audio_mod.log_mel(wav), clock)
        log.info("%s: %d output frames at %.3f fps, loop mode %s", video, num_out, fps, opts.loop_mode)
        from latentsync.syncscore import sync_spans

        plan = Plan(video=video, audio=audio, options=opts, info=info, fps=fps, wav=wav,
                    features=features.float().cpu().numpy(), matrices=matrices, has_face=has_face, num_out=num_out,
                    order=order, chunk_size=self.num_frames,
                    sync_spans=sync_spans(num_out) if self.syncnet is not None else [], seconds=clock.seconds)
        return plan, track if stream else None

    def render(self, plan: Plan, out_path: Path, chunks: range | None = None, *, cancel: Any = None,
               progress: bool = False) -> RenderPart:
        """Write output chunks ``chunks`` (default: all; step 1) of ``plan`` as a silent H.264 file ``out_path``.

        Contract: the frames equal those chunks of a whole run bit for bit before encoding — the seed's noise and
        the VAE posterior draws of every earlier chunk are replayed (drawn, not computed), so parts rendered
        anywhere and joined by ``finish`` give the whole run's video. On error or cancel nothing is left at
        ``out_path``, and no thread or ffmpeg process of the render survives.
        """
        return self._render(plan, Path(out_path), chunks, cancel, progress, None)

    def _render(self, plan: Plan, out_path: Path, chunks: range | None, cancel: Any, progress: bool,
                track: FaceTrack | None) -> RenderPart:
        """``render``; with ``track`` (a streaming plan's pass 1) each chunk first tracks the frames it shows."""
        chunks = range(plan.num_chunks) if chunks is None else chunks
        if chunks.step != 1 or not 0 <= chunks.start < chunks.stop <= plan.num_chunks:
            raise ValueError(f"chunks must be a non-empty range within 0..{plan.num_chunks}, got {chunks}")
        clock = StageClock()
        size = plan.chunk_size
        covered = range(chunks.start * size, min(chunks.stop * size, plan.num_out))

        def source() -> Iterator[Chunk]:
            for c in chunks:
                if track is not None:
                    track.ensure((c + 1) * size)  # the track's clock is the plan's: its seconds count there
                    _check_track(plan.video, track, plan.info)
                # Past the frames tracked so far, chunk_at's count of source frames is the video's (track ended).
                yield chunk_at(c, size, plan.num_out, plan.order, plan.has_face)

        with torch.inference_mode():
            generate = GenerateStage(self, plan.options.seed, plan.features, plan.fps, plan.options, clock, cancel)
            for c in range(chunks.start):
                generate.skip(chunk_at(c, size, plan.num_out, plan.order, plan.has_face))
        align = AlignStage(plan.video, plan.fps, plan.info, plan.matrices, self.resolution, self.device,
                           self.dtype, clock)
        writer = bar = None
        try:  # everything that starts a process or a bar is made inside: an interrupt at any line cleans up
            writer = video_mod.VideoWriter(out_path, plan.fps, plan.info.width, plan.info.height)
            bar = tqdm(total=len(covered), desc="lip-sync", unit="frame", disable=not progress)
            paste = PasteStage(writer, plan.matrices, self.resolution, self.device, plan.sync_spans, clock, bar,
                               tap=self.frame_tap)
            # SyncNet scores while the other stages work where it lives (the CPU); on a GPU, in ``finish``.
            score = ScoreStage(self.syncnet, plan.sync_spans, plan.wav, plan.fps, covered, clock,
                               score_now=self.device.type == "cpu")
            run_stages(source(), [align, generate, paste, score], concurrent=not self.serial, cancel=cancel)
            with clock("encode"):
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
            align.close()
        return RenderPart(path=Path(out_path), chunks=chunks, frames=len(covered), seconds=clock.seconds,
                          sync_scores=score.scores, sync_crops=score.crops)

    def finish(self, plan: Plan, parts: list[Path], output: Path, rendered: list[RenderPart]) -> LipSyncResult:
        """Join the rendered ``parts`` (in chunk order), mux the user's audio into ``output``, score the sync.

        One part is muxed as is; several are concatenated by stream copy first (our own files, same encoder
        settings). ``seconds`` sums the plan's and every part's busy seconds with finishing's own.
        """
        from latentsync.join import join_parts
        from latentsync.syncscore import combine_scores, score_span

        output = Path(output)
        clock = StageClock()
        with tempfile.TemporaryDirectory(prefix="latentsync-") as tmp:
            silent = Path(parts[0])
            if len(parts) > 1:
                with clock("join"):
                    silent = join_parts([Path(p) for p in parts], Path(tmp) / "joined.mp4")
            with clock("mux"):
                video_mod.mux_audio(silent, plan.audio, output, duration=plan.num_out / plan.fps)
        scores = {span: s for part in rendered for span, s in part.sync_scores.items()}
        todo = [span for span in plan.sync_spans if span not in scores]
        if todo:
            crops = {j: c for part in rendered for j, c in part.sync_crops.items()}
            with clock("sync"), self._syncnet_on_device() as syncnet:
                scores.update((span, score_span(syncnet, span, crops, plan.wav, plan.fps)) for span in todo)
        scored = [scores[span] for span in plan.sync_spans if scores[span] is not None]
        if self.syncnet is not None and not scored:
            log.info("output too short to score its sync (SyncNet needs 16 frames at 25 fps)")
        sync = combine_scores(scored) if scored else None
        seconds: dict[str, float] = {}
        for part_seconds in [plan.seconds, *(r.seconds for r in rendered), clock.seconds]:
            for k, v in part_seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
        return LipSyncResult(output=output, seed=plan.options.seed, frames=plan.num_out,
                             frames_with_face=plan.frames_with_face, fps=plan.fps,
                             seconds={k: round(v, 3) for k, v in seconds.items()}, sync=sync)

    def _features(self, mel: torch.Tensor, clock: StageClock) -> torch.Tensor:
        with clock("audio"):
            return self.audio_encoder.features_from_log_mel(mel)

    @contextmanager
    def _syncnet_on_device(self):
        """SyncNet on the model's device while it scores, back on the CPU after (it is needed once per run)."""
        if self.syncnet is None:
            yield None
            return
        self.syncnet.to(self.device)
        try:
            yield self.syncnet
        finally:
            self.syncnet.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _check_track(video: Path, track: FaceTrack, info: video_mod.VideoInfo) -> None:
    """Once pass 1 has ended: an ``InputError`` when it read no frame or found the face in none."""
    if not track.ended:
        return
    if not track.matrices:
        raise InputError(f"{video}: no video frames could be read")
    if not any(track.has_face):
        raise InputError(no_face_message(str(video), info.height, info.width))
