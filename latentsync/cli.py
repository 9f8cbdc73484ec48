"""Command line: ``python -m latentsync VIDEO AUDIO -o OUT``.

Everything the user can get wrong (options, files, the output path, the device) is checked in milliseconds before
any weights are verified or models loaded. A failure is one ``error: …`` line on stderr: exit status 2 when the
input is at fault, 1 when the machine is (disk, network, memory), 130/143 after Ctrl-C/SIGTERM, which stop a run
the way a cancel does (ffmpeg killed, temporary files removed).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from latentsync.errors import InputError, Interrupted, ResourceError
from latentsync.options import DEFAULT_VERSION, DTYPES, FACE_SELECT, FACE_SELECTS, GUIDANCE_SCALE, INFERENCE_STEPS, \
    LOOP_MODE, LOOP_MODES, VERSIONS, RunOptions, check_file


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's one-line form (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options, with upstream's defaults (guidance 1.5, 20 steps, DeepCache on)."""
    p = _Parser(prog="python -m latentsync", description="Lip-sync a video to an audio track (LatentSync).")
    p.add_argument("video", type=Path, help="input video with a visible face")
    p.add_argument("audio", type=Path, help="speech to lip-sync to (any audio or video file ffmpeg reads)")
    # A string, not a Path: Path("dir/") drops the slash that says the user named a folder.
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="a filled folder laid out like upstream's checkpoints/, one version per folder: verified, "
                        "never downloaded into (default: $LATENTSYNC_WEIGHTS_DIR, else ~/.cache/latentsync/VERSION, "
                        "which is filled from the network)")
    p.add_argument("--version", choices=VERSIONS, default=os.environ.get("LATENTSYNC_VERSION", DEFAULT_VERSION),
                   help="LatentSync version (1.5: 256-px crops, 1.6: 512-px); default %(default)s")
    p.add_argument("--unet-config", type=Path, default=None,
                   help="upstream U-Net config overriding the version's (default: $LATENTSYNC_UNET_CONFIG)")
    p.add_argument("--syncnet-config", type=Path, default=None,
                   help="StableSyncNet config (default: $LATENTSYNC_SYNCNET_CONFIG, else the shipped one)")
    p.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance; 1.0 disables it")
    p.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS, help="DDIM steps")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--loop-mode", choices=LOOP_MODES, default=LOOP_MODE,
                   help="when video and audio lengths differ (default %(default)s)")
    p.add_argument("--no-deepcache", dest="deepcache", action="store_false", help="run the full U-Net at every step")
    p.add_argument("--keep-fps", action="store_true", help="process and write at the source frame rate, not 25 fps")
    p.add_argument("--face-point", type=float, nargs=2, metavar=("X", "Y"), default=None,
                   help="edit the face nearest to this pixel on the first frame where a face is visible")
    p.add_argument("--face-select", choices=FACE_SELECTS, default=FACE_SELECT,
                   help="which face to edit when no --face-point is given")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: CUDA when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: fp16 on CUDA sm_80+, else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net and VAE (slower start, faster long runs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p


class _Stop:
    """Turns SIGINT/SIGTERM into ``Interrupted`` in the main thread, and sets ``cancel`` for any worker threads.

    While ``defer`` is true (the lip-sync run itself) the signal only sets ``cancel``: the run stops at its next
    check (between chunks, denoising steps, face-pass frames) and cleans up as a cancel does. An exception raised
    at an arbitrary line could land inside ``subprocess.Popen`` between fork and exec and orphan the child.
    """

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.signum: int | None = None
        self.defer = False

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return  # the first signal's clean-up is running; a second one must not cut it short
        self.signum = signum
        self.cancel.set()
        if self.defer:
            return
        # The exception may land inside a half-built object whose __del__ then fails (tqdm does): that noise,
        # printed as "Exception ignored in …", is not the user's business once the run is being stopped.
        sys.unraisablehook = _ignore
        raise Interrupted(signum)


def _ignore(unraisable) -> None:
    pass


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the exit status says whose move it is (0 done, 2 bad input, 1 the machine, 128+N a signal)."""
    args = build_parser().parse_args(argv)
    # transformers warns about configs on stderr; the CLI's stderr is for our progress and our one error line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    with _stop_on_signals() as stop:
        try:
            return _run(args, stop)
        except BaseException as e:  # noqa: B036 — sorted below; anything we cannot name is re-raised
            status, message = _failure(e, stop.signum)
            if status is None:
                raise
        _close_progress_bars()
        # A signal may have cut a progress bar's redraw short, mid-line: start the message on a line of its own.
        lead = "\n" if stop.signum is not None and not args.quiet else ""
        print(f"{lead}error: {message}", file=sys.stderr)
        return status


def _close_progress_bars() -> None:
    """End the bars a failed run left open, so the error line is the last line and starts on its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _failure(e: BaseException, signum: int | None) -> tuple[int | None, str]:
    """Exit status and one-line message for an exception meant for the user; ``(None, "")`` for a bug."""
    if signum is not None or isinstance(e, (Interrupted, KeyboardInterrupt)):
        # After a signal, whatever surfaced (Interrupted, or a cancel noticed first) is the signal's doing.
        signum = signum if signum is not None else getattr(e, "signum", signal.SIGINT)
        return 128 + signum, f"{Interrupted(signum)}; the run stopped and left no output or temporary files"
    if isinstance(e, InputError):
        return 2, str(e)
    if isinstance(e, ResourceError):
        return 1, str(e)
    if isinstance(e, OSError) and e.strerror:  # the file system said no: a full disk, a vanished mount, ...
        where = f": {e.filename}" if e.filename else ""
        return 1, f"{e.strerror}{where}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return 1, "out of memory; try a shorter or smaller video, --dtype fp16/bf16, or another device"
    return None, ""


def _run(args: argparse.Namespace, stop: _Stop) -> int:
    # Everything the user typed is checked before a weight is read: a bad input costs milliseconds.
    options = RunOptions.make(guidance_scale=args.guidance_scale, inference_steps=args.inference_steps,
                              seed=args.seed, loop_mode=args.loop_mode, deepcache=args.deepcache,
                              keep_fps=args.keep_fps, face_select=args.face_select,
                              face_point=tuple(args.face_point) if args.face_point else None)
    unet_config = _config_file("--unet-config", args.unet_config, "LATENTSYNC_UNET_CONFIG")
    syncnet_config = _config_file("--syncnet-config", args.syncnet_config, "LATENTSYNC_SYNCNET_CONFIG")
    from latentsync.media import caps_from_env

    caps = caps_from_env(os.environ)
    from latentsync.preflight import check_run_paths

    check_run_paths(args.video, args.audio, args.output)
    from latentsync.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)

    from latentsync.download import ensure_weights
    from latentsync.pipeline import LipSync

    named = args.weights_dir or os.environ.get("LATENTSYNC_WEIGHTS_DIR")
    try:
        # A folder the user named is theirs: only verified against the manifest (download.py's rule); without one,
        # the default cache folder is filled from the network.
        weights = ensure_weights(os.environ.get("LATENTSYNC_MANIFEST") or None, Path(named) if named else None,
                                 args.version, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                 cache_home=os.environ.get("XDG_CACHE_HOME") or None)
    except RuntimeError as e:  # the network, not the input
        raise ResourceError(str(e)) from e
    pipe = LipSync.from_pretrained(weights, version=args.version, device=device, dtype=dtype, unet_config=unet_config,
                                   syncnet_config=syncnet_config, compile=args.compile, caps=caps)
    stop.defer = True
    try:
        result = pipe.lipsync(args.video, args.audio, args.output, options=options, cancel=stop.cancel,
                              progress=not args.quiet)
    finally:
        stop.defer = False
    print(f"wrote {result.output}: {result.frames} frames at {result.fps:g} fps, {result.frames_with_face} with a face, "
          f"seed {result.seed}")
    if result.sync is not None:
        s = result.sync
        print(f"sync: offset-0 cosine {s.offset0_cosine:.3f}, best offset {s.best_offset:+d} frames, "
              f"confidence {s.confidence:.3f} ({s.windows} windows)")
    return 0


def _config_file(option: str, given: Path | None, variable: str) -> Path | None:
    """A config named on the command line, else in ``variable``; it must be an existing file."""
    if given is not None:
        return check_file(option, given)
    from_env = os.environ.get(variable)
    return check_file(variable, from_env) if from_env else None


def entry() -> None:
    """``python -m latentsync`` and the ``latentsync`` command: run :func:`main` and exit with its status.

    After a signal our own clean-up has already run (ffmpeg stopped, temporary files removed); the interpreter's
    teardown is then skipped, because tearing down mediapipe's and torch's native threads at exit can abort the
    process (SIGABRT) instead of exiting with 128+N.
    """
    status = main()
    if status >= 128:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
