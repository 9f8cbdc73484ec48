"""Command line: ``python -m latentsync VIDEO AUDIO -o OUT``.

Everything the user can get wrong (options, files, the output path, the device) is checked in milliseconds before
any weights are verified or models loaded. A failure is one ``error: …`` line on stderr: exit status 2 when the
input is at fault, 1 when the machine is (disk, network, memory), 130/143 after Ctrl-C/SIGTERM, which stop a run
the way a cancel does (ffmpeg killed, temporary files removed).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from latentsync.hardware import check_device_available
from latentsync.options import (
    DEEPCACHE,
    FACE_SELECT,
    FACE_SELECTS,
    GUIDANCE_SCALE,
    GUIDANCE_UNTIL,
    LOOP_MODE,
    LOOP_MODES,
    OUTPUT_FPS,
    SAMPLER,
    SAMPLER_STEPS,
    SAMPLERS,
    RunOptions,
)
from latentsync.progress import BarSafeHandler
from latentsync.result import summary_lines
from latentsync.settings import Settings, add_model_arguments
from latentsync.signals import Stop, exit_with, run_door


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's one-line form (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options, with upstream's defaults (guidance 1.5, 20 steps, DeepCache on); each help ends with its
    default, taken from ``latentsync.options``."""
    p = _Parser(prog="python -m latentsync", description="Lip-sync a video to an audio track (LatentSync).")
    p.add_argument("video", type=Path, help="input video with a visible face")
    p.add_argument("audio", type=Path, help="speech to lip-sync to (any audio or video file ffmpeg reads)")
    # A string, not a Path: Path("dir/") drops the slash that says the user named a folder.
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov, .mkv or .m4v)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, in one rename once the new one is complete (default: an "
                        "existing output is refused)")
    p.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE,
                   help="classifier-free guidance; 1.0 disables it (default: %(default)s)")
    per_sampler = ", ".join(f"{name} {steps}" for name, steps in SAMPLER_STEPS.items())
    p.add_argument("--inference-steps", type=int, default=None,
                   help=f"denoising steps (default: the sampler's: {per_sampler})")
    p.add_argument("--sampler", choices=SAMPLERS, default=SAMPLER,
                   help="ddim (upstream's), or the multistep solvers dpmpp_2m and unipc, which need fewer steps "
                        "(default: %(default)s)")
    p.add_argument("--guidance-until", type=float, default=GUIDANCE_UNTIL, metavar="FRACTION",
                   help="guide only the first FRACTION of the steps, the later ones at half the U-Net batch "
                        "(default: %(default)s, every step)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--loop-mode", choices=LOOP_MODES, default=LOOP_MODE,
                   help="when video and audio lengths differ (default: %(default)s)")
    p.add_argument("--no-deepcache", dest="deepcache", action="store_false",
                   help=f"run the full U-Net at every step (default: DeepCache {'on' if DEEPCACHE else 'off'})")
    p.add_argument("--keep-fps", action="store_true",
                   help=f"process and write at the source frame rate (default: off, {OUTPUT_FPS:g} fps)")
    p.add_argument("--face-point", type=float, nargs=2, metavar=("X", "Y"), default=None,
                   help="edit the face nearest to this pixel on the first frame where a face is visible (default: "
                        "the face --face-select picks)")
    p.add_argument("--face-select", choices=FACE_SELECTS, default=FACE_SELECT,
                   help="which face to edit when no --face-point is given (default: %(default)s)")
    p.add_argument("--ranges", default="", metavar="START-STOP,...",
                   help="lip-sync only these times of the output (12.5-18,1:40-1:42.2; seconds, MM:SS.s or "
                        "HH:MM:SS.s) and pass every other frame through (default: the whole video)")
    add_model_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars, warnings only (default: bars and progress lines on stderr)")
    return p


def main(argv: list[str] | None = None, *, exits: bool = False) -> int:
    """Run the CLI; the exit status says whose move it is (0 done, 2 bad input, 1 the machine, 128+N a signal).
    ``exits``: the process exits with the status next (:func:`entry`), so a signal once the output is written ends
    it with 0 at once."""
    args = build_parser().parse_args(argv)
    # Paths are what the OS gave: bytes that are not UTF-8 arrive as surrogate escapes; the summary prints them as
    # those bytes, messages as \udcXX (Python's own choice for stderr, whatever stream the caller gave).
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors=errors)
    # transformers warns about configs on stderr; the CLI's stderr is for our progress and our one error line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Log lines go out through the bars' own writer, so that a line never lands inside a bar.
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[BarSafeHandler(sys.stderr)])
    # The run's progress bars close on the way out (before the error line).
    return run_door(lambda stop: _run(args, stop), progress=not args.quiet, exits=exits,
                    stopped="the run stopped and left no output or temporary files")


def _run(args: argparse.Namespace, stop: Stop) -> int:
    # Everything the user typed is checked before a weight is read: a bad input costs milliseconds.
    options = RunOptions.make(guidance_scale=args.guidance_scale, inference_steps=args.inference_steps,
                              sampler=args.sampler, guidance_until=args.guidance_until,
                              seed=args.seed, loop_mode=args.loop_mode, deepcache=args.deepcache,
                              keep_fps=args.keep_fps, face_select=args.face_select,
                              face_point=tuple(args.face_point) if args.face_point else None, ranges=args.ranges)
    settings = Settings.from_args(args, os.environ)
    # Imported here: latentsync.video needs numpy, which an option's error should not wait for.
    from latentsync.preflight import check_inputs, check_options

    # The caps before any weight is read; an existing output only with --overwrite.
    inputs = check_inputs(args.video, args.audio, args.output, settings.caps, overwrite=args.overwrite)
    check_device_available(settings.device)  # a device the machine lacks, told before torch is imported
    from latentsync.devices import pick_device, pick_dtype, use_expandable_segments

    use_expandable_segments()  # before torch first touches CUDA
    pick_dtype(pick_device(settings.device), settings.dtype)
    check_options(inputs, options)  # the time ranges against the inputs' lengths: still before any weight
    # A folder the user named is theirs: only verified against the manifest (download.py's rule); without one,
    # the default cache folder is filled from the network.
    pipe = settings.load(settings.weights())
    with stop.deferred() as cancel:
        result = pipe.run(inputs, options, cancel=cancel, progress=not args.quiet)
        stop.finished()  # the output is in place: a signal from here on changes nothing (exit 0)
    print("\n".join(summary_lines(result)))
    return 0


def entry() -> None:
    """``python -m latentsync`` and the ``latentsync`` command: run :func:`main` and exit with its status."""
    exit_with(main(exits=True))
