"""Cog front door for LatentSync: declares the inputs, loads the pipeline once, runs it once per prediction.

All the work lives in ``latentsync`` (weights in ``latentsync.download``, the lip-sync in ``latentsync.pipeline``).
Environment: ``LATENTSYNC_WEIGHTS_DIR`` (a pre-filled weights folder; nothing is downloaded), ``LATENTSYNC_VERSION``
(1.5 or 1.6, default 1.6), ``LATENTSYNC_UNET_CONFIG`` (another U-Net config, e.g. tiny test models),
``LATENTSYNC_MANIFEST`` (another weights manifest than ``weights.txt``).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path as FsPath
from typing import Any, Optional

from cog import BasePredictor, Input, Path

from latentsync.download import ensure_weights, resolve_version
from latentsync.errors import InputError
from latentsync.pipeline import FACE_SELECTS, LOOP_MODES

ROOT = FsPath(__file__).resolve().parent

log = logging.getLogger("predict")


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Make sure the weights are there (download or verify), then load every model once."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        started = time.perf_counter()
        version = resolve_version()
        prefilled = os.environ.get("LATENTSYNC_WEIGHTS_DIR")
        weights_dir = ensure_weights(None, prefilled or ROOT / "checkpoints" / f"latentsync-{version}", version,
                                     download=not prefilled)
        weights_s = time.perf_counter() - started

        import torch

        from latentsync.pipeline import LipSync

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = LipSync.from_pretrained(weights_dir, version=version, device=device,
                                            unet_config=os.environ.get("LATENTSYNC_UNET_CONFIG") or None,
                                            syncnet_config=os.environ.get("LATENTSYNC_SYNCNET_CONFIG") or None)
        # One folder per worker; each prediction gets its own sub-folder and removes the previous one.
        self.work_root = FsPath(tempfile.mkdtemp(prefix="latentsync-cog-"))
        self.last_run: FsPath | None = None
        log.info("setup done in %.1f s: LatentSync %s from %s (weights %.1f s) on %s, %s",
                 time.perf_counter() - started, version, weights_dir, weights_s, self.pipe.device,
                 str(self.pipe.dtype).removeprefix("torch."))

    def predict(
        self,
        video: Path = Input(description="Video with a visible, roughly frontal face (mp4, mov, webm, mkv, …)."),
        audio: Path = Input(description="Speech to lip-sync to (wav, mp3, m4a, flac, … or a video's soundtrack)."),
        guidance_scale: float = Input(
            description="Classifier-free guidance on the audio: higher follows the speech more closely, "
                        "1.0 turns guidance off.", ge=1.0, le=3.0, default=1.5),
        inference_steps: int = Input(description="Denoising steps: more is slower and slightly sharper.",
                                     ge=10, le=50, default=20),
        seed: Optional[int] = Input(description="Random seed for reproducible output; leave empty for a random one "
                                                "(the seed used is reported in the metrics).", default=None),
        loop_mode: str = Input(
            description="When the audio is longer than the video: bounce (play the video forwards and backwards), "
                        "loop (restart it), cut_off (stop at the end of the shorter one), silence (keep the whole "
                        "video, closing the mouth after the audio ends).", choices=list(LOOP_MODES), default="bounce"),
        enable_deepcache: bool = Input(description="Reuse deep U-Net features between steps: about twice as fast, "
                                                   "with a small quality cost.", default=True),
        keep_fps: bool = Input(description="Keep the input frame rate instead of converting to 25 fps, the rate "
                                           "LatentSync was trained at.", default=False),
        face_select: str = Input(description="Which face to lip-sync when several are visible: the largest, or the "
                                             "one whose mouth moves with the audio.", choices=list(FACE_SELECTS),
                                 default="largest"),
    ) -> Path:
        run = self._fresh_folder()
        output = run / f"lipsync-{run.name}.mp4"
        video, audio = _local(video), _local(audio)
        try:
            result = self.pipe.lipsync(
                video, audio, output, guidance_scale=guidance_scale, inference_steps=inference_steps, seed=seed,
                loop_mode=loop_mode, deepcache=enable_deepcache, keep_fps=keep_fps, face_select=face_select)
        except InputError as e:
            shutil.rmtree(run, ignore_errors=True)
            # Cog's temporary file names mean nothing to the user: name the inputs instead.
            raise InputError(_one_line(e, {video: "<video>", audio: "<audio>"})) from None
        except BaseException as e:  # noqa: BLE001 — out-of-memory and cancellation need cleanup, then re-raise
            # The library kills its own ffmpeg processes when interrupted (readers and writers close in `finally`).
            shutil.rmtree(run, ignore_errors=True)
            if _is_out_of_memory(e):
                _free_gpu_memory()
                raise RuntimeError("out of GPU memory on this video; try a shorter or lower-resolution video, or "
                                   "fewer inference steps") from None
            raise
        self._report(result)
        return Path(result.output)

    # ------------------------------------------------------------------------------------------------ helpers
    def _fresh_folder(self) -> FsPath:
        """A new, uniquely named folder for this prediction; the previous one (already returned) is removed."""
        if self.last_run is not None:
            shutil.rmtree(self.last_run, ignore_errors=True)
        run = self.work_root / uuid.uuid4().hex[:12]
        run.mkdir(parents=True)
        self.last_run = run
        return run

    def _report(self, result: Any) -> None:
        print(f"seed: {result.seed}; {result.frames} frames, {result.frames_with_face} with a face")
        self.record_metric("seed", result.seed)
        self.record_metric("frames", result.frames)
        self.record_metric("frames_with_face", result.frames_with_face)
        for stage, seconds in result.seconds.items():
            self.record_metric(f"seconds.{stage}", round(float(seconds), 3))
        sync = result.sync
        if sync is not None:
            fields = dataclasses.asdict(sync) if dataclasses.is_dataclass(sync) else dict(vars(sync))
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.record_metric(f"sync.{key}", float(value))


def _local(path: Any) -> FsPath:
    """A local file for a Cog input: URL inputs that Cog left undownloaded are fetched, strings become paths."""
    convert = getattr(path, "convert", None)
    return FsPath(convert() if callable(convert) else path)


def _one_line(error: BaseException, names: dict[FsPath, str] | None = None) -> str:
    """The error message on one line, with input file paths replaced by the inputs' names."""
    text = str(error)
    for path, label in (names or {}).items():
        for form in (str(path.resolve()), str(path), path.name):
            text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?![\w.-])", label, text)
    return " ".join(text.split()) or type(error).__name__


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
