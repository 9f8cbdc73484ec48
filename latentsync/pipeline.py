"""The lip-sync pipeline: upstream LatentSync's maths, streamed so memory stays flat on long videos.

A run is ``plan`` → ``render`` → ``finish``:
1. *plan* (``plan.make_plan``): probe, audio features, pass 1 over the video (one face followed, only its
   smoothed 2×3 matrix kept per frame; Whisper runs beside it), the output's length and frame order, sync spans;
2. *render* (``render.render_part``): the output's 16-frame chunks through the synthesis stages (``stages``),
   run concurrently, into a silent H.264 part;
3. *finish* (``render.finish_run``): join the rendered parts, mux the user's own audio, score the sync.
Rendering is split into chunk ranges so that several workers can render parts of one video. ``lipsync`` leaves
pass 1 running into the render (``plan.open_plan``): each chunk waits only for the frames it shows and, where the
output's length is the video's, for what that length decides of it. Every hop gets the run's ``RunContext``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from latentsync import media, preflight
from latentsync.context import RunContext
from latentsync.control import Cancel
from latentsync.facepool import Detectors, default_workers
from latentsync.hardware import map_large_buffers
from latentsync.loader import Models, compile_models, load_models
from latentsync.options import RunOptions
from latentsync.plan import Plan, RenderPart, close_plan, make_plan, open_plan
from latentsync.progress import Progress
from latentsync.render import finish_run, render_part
from latentsync.result import LipSyncResult
from latentsync.stages.generate import warm_up

log = logging.getLogger(__name__)


class LipSync:
    """LatentSync with every model loaded once; call :meth:`lipsync` for each video.

    ``serial = True`` runs the synthesis stages one after another instead of concurrently (same frames);
    ``frame_tap(j, frame)``, when set, sees each output frame before it is encoded.
    """

    serial = False
    frame_tap = None

    def __init__(self, models: Models, *, face_workers: int = 0, caps: media.MediaCaps | None = None):
        self.models = models
        self.face_workers = int(face_workers)
        self.caps = caps or media.MediaCaps()  # the deployment's limits on input size and duration
        self._detectors = Detectors()

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path, version: str = "1.6", device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, unet_config: str | Path | None = None,
                        syncnet_config: str | Path | None = None, *, compile: bool = False,
                        face_workers: int | None = None, caps: media.MediaCaps | None = None,
                        compile_cache: str | Path | None = None) -> LipSync:
        """Load VAE, U-Net, Whisper (and SyncNet when present) from a folder laid out like upstream's ``checkpoints/``.

        ``unet_config`` defaults to the config of ``version``; its ``data.resolution`` must match the checkpoint
        (1.5 = 256 px, 1.6 = 512 px). ``syncnet_config`` defaults to the shipped StableSyncNet config.
        ``compile=True`` compiles the U-Net's full and shallow passes and the VAE and warms them up here (minutes
        the first time; cached in ``compile_cache``, default ``weights_dir/compile-cache``). ``face_workers``:
        face-detection processes (None: by core count).
        """
        map_large_buffers()  # before the weights and the first frames are allocated: flat host memory
        models = load_models(Path(weights_dir), version, device, dtype, unet_config, syncnet_config)
        if compile:  # compiled by a warm-up
            models = compile_models(models, Path(compile_cache or Path(weights_dir) / "compile-cache"), warm_up)
        elif models.device.type == "cuda":  # cuDNN plans a run's convolutions now, not in the first prediction
            warm_up(models)
        return cls(models, face_workers=default_workers() if face_workers is None else face_workers, caps=caps)

    def close(self) -> None:
        """Stop the face-detection workers, free the detector (workers are also stopped at exit), and stop the
        stages' threads (a later run starts them again)."""
        self._detectors.close()
        self.models.threads.close()

    # ------------------------------------------------------------------------------------------------ public API
    def lipsync(self, video: str | Path, audio: str | Path, output: str | Path,
                options: RunOptions | dict[str, object] | None = None, *, cancel: Cancel | None = None,
                progress: bool | Progress = False, overwrite: bool = False, **overrides: object) -> LipSyncResult:
        """Lip-sync ``video`` to ``audio`` and write an H.264/AAC mp4 to ``output``: plan → render → finish.

        ``options`` is a :class:`RunOptions` (or a dict of its fields); keyword ``overrides`` name the same fields
        (``guidance_scale=``, ``seed=``, …). ``cancel`` is any object with ``is_set()`` (a ``threading.Event``);
        it is checked between chunks and denoising steps. ``progress``: True for tqdm bars on stderr, or a
        :class:`latentsync.progress.Progress` that hears each stage start and its frames (log lines, a status).
        An existing ``output`` is an ``InputError`` unless ``overwrite``; it is then replaced in one rename, once the
        new file is complete.
        """
        opts = RunOptions.make(options, **overrides)
        # Before any model runs or frame is decoded: one line.
        inputs = preflight.check_inputs(video, audio, output, self.caps, overwrite=overwrite)
        return self.run(inputs, opts, cancel=cancel, progress=progress)

    def run(self, inputs: preflight.Inputs, options: RunOptions, *, cancel: Cancel | None = None,
            progress: bool | Progress = False) -> LipSyncResult:
        """:meth:`lipsync` of files already checked (``preflight.check_inputs``, which the CLI calls before it loads
        the models): the run's files are checked and the video probed once."""
        t0 = time.perf_counter()
        opts = options.with_seed()
        output = inputs.output
        output.parent.mkdir(parents=True, exist_ok=True)
        run = self._context(cancel, progress)
        # Synthesis need not wait for pass 1 to end: each chunk is rendered once the frames it shows are tracked
        # and (cut_off, silence: the output's length is the video's) once no length still possible changes it.
        opened = open_plan(inputs.video, inputs.audio, inputs.info, opts, run)
        with opened.track, tempfile.TemporaryDirectory(prefix="latentsync-") as tmp:
            part = render_part(opened, Path(tmp) / "video.mp4", None, run)
            plan = close_plan(opened)
            # A length settled during the render: the part was counted from the estimate.
            part.chunks, part.frames = range(plan.num_chunks), plan.num_out
            result = finish_run(plan, [part], output, run)
        result.seconds["wall"] = round(time.perf_counter() - t0, 3)
        log.info("wrote %s: %d frames, %d with a face, seed %d, %s", output, result.frames, result.frames_with_face,
                 result.seed, result.seconds)
        return result

    def plan(self, video: str | Path, audio: str | Path, options: RunOptions, *, cancel: Cancel | None = None,
             progress: bool | Progress = False) -> Plan:
        """Decide the run: probe, audio features, face pass 1 (matrices), output length and order, sync spans.

        Raises ``InputError`` for unusable inputs (no frames, no face anywhere) before any frame is generated.
        ``options`` without a seed gets a random one here; the plan carries it, so every ``render`` of the plan
        makes the same random draws.
        """
        sources = preflight.check_sources(video, audio, self.caps)
        return make_plan(sources.video, sources.audio, sources.info, options.with_seed(),
                         self._context(cancel, progress))

    def render(self, plan: Plan, out_path: Path, chunks: range | None = None, *, cancel: Cancel | None = None,
               progress: bool | Progress = False) -> RenderPart:
        """Write output chunks ``chunks`` (default: all; step 1) of ``plan`` as a silent H.264 file ``out_path``.

        Contract: the frames equal those chunks of a whole run bit for bit before encoding — the seed's noise and
        the VAE posterior draws of every earlier chunk are replayed (drawn, not computed), so parts rendered
        anywhere and joined by ``finish`` give the whole run's video. On error or cancel nothing is left at
        ``out_path``, and no thread or ffmpeg process of the render survives.
        """
        return render_part(plan, Path(out_path), chunks, self._context(cancel, progress))

    def finish(self, plan: Plan, rendered: list[RenderPart], output: str | Path, *,
               progress: bool | Progress = False) -> LipSyncResult:
        """Join the ``rendered`` parts (in chunk order), mux the user's audio into ``output``, score the sync.

        One part is muxed as is; several are concatenated by stream copy first (our own files, same encoder
        settings). ``seconds`` sums the plan's and every part's busy seconds with finishing's own.
        """
        return finish_run(plan, rendered, Path(output), self._context(None, progress))

    def _context(self, cancel: Cancel | None, progress: bool | Progress | None) -> RunContext:
        return RunContext.make(self.models, self._detectors, self.face_workers, self.caps, cancel=cancel,
                               progress=progress, serial=self.serial, tap=self.frame_tap)
