"""Command line: ``python -m latentsync VIDEO AUDIO -o OUT``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from latentsync.errors import InputError
from latentsync.options import DEFAULT_VERSION, DTYPES, FACE_SELECT, FACE_SELECTS, GUIDANCE_SCALE, INFERENCE_STEPS, \
    LOOP_MODE, LOOP_MODES, VERSIONS


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options, with upstream's defaults (guidance 1.5, 20 steps, DeepCache on)."""
    p = argparse.ArgumentParser(prog="python -m latentsync", description="Lip-sync a video to an audio track (LatentSync).")
    p.add_argument("video", type=Path, help="input video with a visible face")
    p.add_argument("audio", type=Path, help="speech to lip-sync to (any audio or video file ffmpeg reads)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .mp4")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="a filled folder laid out like upstream's checkpoints/, one version per folder: verified, "
                        "never downloaded into (default: $LATENTSYNC_WEIGHTS_DIR, else ~/.cache/latentsync/VERSION, "
                        "which is filled from the network)")
    p.add_argument("--version", choices=VERSIONS, default=os.environ.get("LATENTSYNC_VERSION", DEFAULT_VERSION),
                   help="LatentSync version (1.5: 256-px crops, 1.6: 512-px); default %(default)s")
    p.add_argument("--unet-config", type=Path, default=os.environ.get("LATENTSYNC_UNET_CONFIG") or None,
                   help="upstream U-Net config overriding the version's (default: $LATENTSYNC_UNET_CONFIG)")
    p.add_argument("--syncnet-config", type=Path, default=os.environ.get("LATENTSYNC_SYNCNET_CONFIG") or None,
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
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: fp16 on CUDA sm_80+, else fp32")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; exit status 2 with a one-line message on bad input."""
    args = build_parser().parse_args(argv)
    if args.weights_dir is None and os.environ.get("LATENTSYNC_WEIGHTS_DIR"):
        args.weights_dir = Path(os.environ["LATENTSYNC_WEIGHTS_DIR"])  # named folders are verified, never filled
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        from latentsync.download import ensure_weights
        from latentsync.pipeline import LipSync

        try:
            weights = ensure_weights(os.environ.get("LATENTSYNC_MANIFEST") or None, args.weights_dir, args.version,
                                     endpoint=os.environ.get("HF_ENDPOINT") or None,
                                     cache_home=os.environ.get("XDG_CACHE_HOME") or None)
        except RuntimeError as e:  # the network, not the input: still one line, another status
            print(f"error: {e}", file=sys.stderr)
            return 1
        pipe = LipSync.from_pretrained(weights, version=args.version, device=args.device, dtype=args.dtype,
                                       unet_config=args.unet_config, syncnet_config=args.syncnet_config)
        result = pipe.lipsync(args.video, args.audio, args.output, guidance_scale=args.guidance_scale,
                              inference_steps=args.inference_steps, seed=args.seed, loop_mode=args.loop_mode,
                              deepcache=args.deepcache, keep_fps=args.keep_fps,
                              face_point=tuple(args.face_point) if args.face_point else None,
                              face_select=args.face_select, progress=not args.quiet)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.output}: {result.frames} frames at {result.fps:g} fps, {result.frames_with_face} with a face, "
          f"seed {result.seed}")
    if result.sync is not None:
        s = result.sync
        print(f"sync: offset-0 cosine {s.offset0_cosine:.3f}, best offset {s.best_offset:+d} frames, "
              f"confidence {s.confidence:.3f} ({s.windows} windows)")
    return 0
