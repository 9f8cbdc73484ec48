"""Cog front door for LatentSync: declares the inputs, loads the pipeline once, runs it once per prediction.

All the work lives in ``latentsync`` (weights in ``latentsync.download``, the lip-sync in ``latentsync.pipeline``).
The inputs are written as literals because ``cog build`` reads them by parsing this file, not by importing it;
tests/test_cog_static_schema.py keeps them equal to ``latentsync.options``.
The environment is read here only, by ``latentsync.settings`` (the CLI's variables: ``LATENTSYNC_WEIGHTS_DIR`` for
a pre-filled, possibly read-only weights folder, ``LATENTSYNC_VERSION``, ``LATENTSYNC_COMPILE=1``, ``HF_ENDPOINT``,
...). Without ``LATENTSYNC_WEIGHTS_DIR`` the weights are downloaded into ``weights/<version>`` beside this file
(:data:`WEIGHTS_HOME`), not into ``~/.cache``.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path as FsPath
from typing import Any

from cog import BasePredictor, Input, Path

from latentsync.errors import InputError, describe, is_out_of_memory
from latentsync.options import RunOptions, parse_ranges
from latentsync.progress import WEIGHTS, LogLines, Progress
from latentsync.result import LipSyncResult, metrics, summary_lines
from latentsync.settings import Settings

# Literal copies of latentsync.options.LOOP_MODES / FACE_SELECTS (Cog's static parser cannot follow an import).
LOOP_MODES = ["bounce", "loop", "cut_off", "silence"]
FACE_SELECTS = ["largest", "active_speaker"]
SAMPLERS = ["ddim", "dpmpp_2m", "unipc"]  # latentsync.options.SAMPLERS
# The prediction's logs get each stage's name as it starts, then a line with percent, frames and ETA each time
# another PROGRESS_EVERY_PERCENT of its frames is done or PROGRESS_EVERY_S have passed, whichever comes first.
PROGRESS_EVERY_PERCENT = 10.0
PROGRESS_EVERY_S = 30.0

# Cog 0.20 renamed BasePredictor, predict() and cog.yaml's `predict:` to BaseRunner, run() and `run:`, and still reads
# the old names as the same contract. The container keeps the form its users and Replicate's docs know, so the SDK's
# Python warnings about those two names, printed at every boot, are not shown (the README's Cog section says more).
warnings.filterwarnings("ignore", message=r"(BasePredictor|Predictor\.predict\(\)) is deprecated",
                        category=DeprecationWarning)

log = logging.getLogger("predict")
# Project-relative, so `cog predict` (which mounts the project over the container's working directory) boots the
# second time from disk; .gitignore and .dockerignore keep the folder out of git and out of the image.
WEIGHTS_HOME = FsPath(__file__).resolve().parent / "weights"


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Make sure the weights are there (download into the default folder, or verify a named one), load once."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        started = time.perf_counter()
        from latentsync.devices import use_expandable_segments

        use_expandable_segments()  # before torch first touches CUDA (cog.yaml sets it too, for the container)
        settings = Settings.read(os.environ, download_home=WEIGHTS_HOME)
        with Progress(LogLines(log.info)).stage(WEIGHTS):
            weights_dir = settings.weights()
            weights_s = time.perf_counter() - started
            self.pipe = settings.load(weights_dir)
        # One folder per worker; each prediction gets its own sub-folder and removes the previous one.
        self.work_root = FsPath(tempfile.mkdtemp(prefix="latentsync-cog-"))
        self.last_run: FsPath | None = None
        # Cog's copies of URL and data: inputs and the pipeline's temporary folders are made with `tempfile`: in Cog's
        # worker process (a process of its own, coglet.server.active) they go into the worker's folder too, so that
        # whatever a stopped server leaves lies under one folder.
        self.scratch = self.work_root / "tmp"
        self.scratch.mkdir()
        if getattr(getattr(sys.modules.get("coglet"), "server", None), "active", False):
            tempfile.tempdir = str(self.scratch)
        self.reaper = _remove_at_exit(self.work_root)
        log.info("setup done in %.1f s: LatentSync %s from %s (weights %.1f s) on %s, %s%s",
                 time.perf_counter() - started, settings.version, weights_dir, weights_s, self.pipe.models.device,
                 str(self.pipe.models.dtype).removeprefix("torch."), ", compiled" if settings.compile else "")

    def predict(
        self,
        video: Path = Input(
            description="Video with a visible, roughly frontal face (mp4, mov, webm, mkv or any format ffmpeg reads).",
            accept="video/*",
        ),
        audio: Path = Input(
            description="Speech to lip-sync to (wav, mp3, m4a, flac, or a video whose soundtrack is used).",
            accept="audio/*,video/*",
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance on the audio: higher follows the speech more closely; 1.0 is off.",
            ge=1.0, le=3.0, default=1.5,
        ),
        inference_steps: int | None = Input(
            description="Denoising steps, empty for the sampler's (ddim 20, dpmpp_2m 10, unipc 10); fewer to preview.",
            ge=1, le=100, default=None,
        ),
        sampler: str = Input(
            description="ddim (upstream's), or the multistep solvers dpmpp_2m and unipc, made for fewer steps.",
            choices=SAMPLERS, default="ddim",
        ),
        guidance_until: float = Input(
            description="Guide only this first fraction of the steps; the rest run at half the U-Net cost. 1.0: all.",
            ge=0.0, le=1.0, default=1.0,
        ),
        seed: int | None = Input(
            description="Random seed: empty for a random one (see the metrics); 0 is an ordinary seed, not random.",
            ge=0, le=4294967295, default=None,
        ),
        loop_mode: str = Input(
            description="If lengths differ: bounce (to and fro), loop, cut_off (the shorter), silence (mouth shut).",
            choices=LOOP_MODES, default="bounce",
        ),
        enable_deepcache: bool = Input(
            description="Reuse deep U-Net features between steps: about twice as fast, with a small quality cost.",
            default=True,
        ),
        keep_fps: bool = Input(
            description="Keep the input frame rate instead of 25 fps, the rate LatentSync was trained at.",
            default=False,
        ),
        face_select: str = Input(
            description="Which face to edit when several show: the largest, or the one whose mouth follows the audio.",
            choices=FACE_SELECTS, default="largest",
        ),
        ranges: str = Input(
            description="Times to lip-sync, e.g. 12.5-18,1:40-1:42.2 (s, MM:SS.s, HH:MM:SS.s); empty: the whole video.",
            default="",
        ),
    ) -> Path:
        video, audio = _local(video), _local(audio)
        run = self._fresh_folder(keep=(video, audio))
        output = run / f"lipsync-{run.name}.mp4"
        names = {video: "<video>", audio: "<audio>", output: "<output>", run: "<run folder>"}
        scrubber = _PathScrubber(names)
        handlers = logging.getLogger().handlers
        for handler in handlers:
            handler.addFilter(scrubber)
        out_of_memory = None
        try:
            options = RunOptions(guidance_scale=guidance_scale, inference_steps=inference_steps, sampler=sampler,
                                 guidance_until=guidance_until, seed=seed,
                                 loop_mode=loop_mode, deepcache=enable_deepcache, keep_fps=keep_fps,
                                 face_select=face_select, ranges=parse_ranges(ranges))
            progress = Progress(LogLines(log.info, every_percent=PROGRESS_EVERY_PERCENT, every_s=PROGRESS_EVERY_S))
            result = self.pipe.lipsync(video, audio, output, options=options, progress=progress)
        except BaseException as e:  # noqa: BLE001 — out-of-memory and cancellation need cleanup, then re-raise
            # The library kills its own ffmpeg processes when interrupted (readers and writers close in `finally`).
            shutil.rmtree(run, ignore_errors=True)
            if not isinstance(e, InputError) and not is_out_of_memory(e):
                raise  # bugs, cancellation and the machine's other troubles reach Cog as they are
            # The message every front door gives; Cog's temporary file names mean nothing to the user: name the
            # inputs instead.
            described = describe(e)
            assert described is not None  # describe() has a line for every InputError and out-of-memory error
            message = _replace_paths(described[1], names)
            if isinstance(e, InputError):
                raise InputError(message) from None
            out_of_memory = message
        finally:
            for handler in handlers:
                handler.removeFilter(scrubber)
        if out_of_memory is not None:
            # Out of the except block: its traceback held the failed run's frames, and with them its GPU tensors.
            _free_gpu_memory()
            raise RuntimeError(out_of_memory)
        self._report(result)
        return Path(result.output)

    # ------------------------------------------------------------------------------------------------ helpers
    def _fresh_folder(self, keep: tuple[FsPath, ...] = ()) -> FsPath:
        """A new, uniquely named folder for this prediction; the previous one (already returned) is removed, and so
        is what earlier predictions left in the scratch folder (Cog keeps an input copy after a failed download or
        an early cancel): with one prediction at a time, only this one's inputs (``keep``) are in use there."""
        if self.last_run is not None:
            shutil.rmtree(self.last_run, ignore_errors=True)
        kept = {path.resolve() for path in keep}
        for leftover in self.scratch.iterdir():
            if leftover.resolve() not in kept:
                _remove(leftover)
        run = self.work_root / uuid.uuid4().hex[:12]
        run.mkdir(parents=True)
        self.last_run = run
        return run

    def _report(self, result: LipSyncResult) -> None:
        """The run's summary in the logs (its output path is a temporary one: not shown) and its metrics."""
        print("\n".join(summary_lines(result, show_output=False)))
        for key, value in metrics(result).items():
            # A dotted name is how Cog nests a metric (``seconds.denoise`` → ``{"seconds": {"denoise": …}}``).
            if isinstance(value, dict):
                for inner, number in value.items():
                    self.record_metric(f"{key}.{inner}", number)
            elif value is not None:  # None would delete the metric: a run without a sync score has none
                self.record_metric(key, value)


class _PathScrubber(logging.Filter):
    """Rewrites log records so that Cog's temporary paths appear as the inputs' names (``<video>``, …)."""

    def __init__(self, names: dict[FsPath, str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        cleaned = _replace_paths(text, self.names)
        if cleaned != text:
            record.msg, record.args = cleaned, None
        return True


def _local(path: Any) -> FsPath:
    """A local file for a Cog input: URL inputs that Cog left undownloaded are fetched, strings become paths."""
    convert = getattr(path, "convert", None)
    return FsPath(convert() if callable(convert) else path)


def _replace_paths(text: str, names: dict[FsPath, str]) -> str:
    """``text`` with each path of ``names`` (absolute, as given, or its bare file name) replaced by its label."""
    for path, label in names.items():
        for form in (str(path.resolve()), str(path), path.name):
            text = re.sub(rf"(?<![\w./-]){re.escape(form)}(?![\w.-])", label, text)
    return text


def _remove(path: FsPath) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# Waits until the worker's end of its stdin pipe closes, which happens however the worker ends (a normal exit, or the
# SIGKILL Cog sends a worker that is still predicting 10 s after a SIGTERM or /shutdown), then removes the folder.
# ffmpeg children may still be closing their files: a second try catches what they wrote meanwhile.
_REAPER = """import shutil, sys, time
sys.stdin.buffer.read()
for delay in (0.0, 0.5, 2.0):
    time.sleep(delay)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _remove_at_exit(folder: FsPath) -> subprocess.Popen[bytes]:
    """Start the process that removes ``folder`` once this one has ended (its own session: a signal to the server's
    process group does not stop it first); also removed here at a normal exit, in case that process was stopped."""
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
