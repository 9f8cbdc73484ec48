"""What editing one time range costs against the whole video, on CPU with tiny random models.

    .venv/bin/python benchmarks/ranges_bench.py                 # 60 s clip, one 5 s range (30-35)
    .venv/bin/python benchmarks/ranges_bench.py --seconds 30 --ranges 10-12,20-21

Plans and renders the clip twice with the same seed, without and with ``--ranges``, and prints the wall seconds of
planning (face pass, Whisper) and of synthesis (``render``: read, align, VAE, denoise, paste, encode), the busy
seconds of each stage, and synthesis with the range as a share of the whole run's (the target: ≤ 20 % for 5 s of
60 s): the busy seconds of the per-chunk work (align, VAE, denoise, paste), and the render's wall, which also holds
decoding and encoding every frame of the output (with tiny models a large part; with the real ones a small one).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # this checkout first

from latentsync.options import RunOptions  # noqa: E402
from latentsync.pipeline import LipSync  # noqa: E402
from media_utils import face_clip, speech  # noqa: E402
from tiny_weights import make_tiny_weights  # noqa: E402

MODEL = ("align", "vae_encode", "denoise", "vae_decode", "restore")  # the per-chunk synthesis work
SHOWN = ("faces", "audio", "read", "align", "vae_encode", "denoise", "vae_decode", "restore", "encode")


def run(pipe: LipSync, clip: Path, wav: Path, out: Path, options: RunOptions) -> dict[str, float]:
    """Wall seconds of plan and render, and the busy seconds of every stage of both."""
    t0 = time.perf_counter()
    plan = pipe.plan(clip, wav, options)
    t1 = time.perf_counter()
    part = pipe.render(plan, out)
    t2 = time.perf_counter()
    busy = {k: plan.seconds.get(k, 0.0) + part.seconds.get(k, 0.0) for k in SHOWN}
    return {"plan": t1 - t0, "render": t2 - t1, **busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ranges", default="30-35")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="a folder to copy the two outputs into (whole.mp4, ranged.mp4)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ranges-bench-") as tmp:
        d = Path(tmp)
        folder, cfg = make_tiny_weights(d / "weights")
        pipe = LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu",
                                       face_workers=0)
        clip, wav = face_clip(d / "clip.mp4", int(a.seconds * 25)), speech(d / "speech.wav", a.seconds)
        whole = run(pipe, clip, wav, d / "whole.mp4", RunOptions(seed=1, inference_steps=a.steps))
        ranged = run(pipe, clip, wav, d / "ranged.mp4", RunOptions(seed=1, inference_steps=a.steps, ranges=a.ranges))
        pipe.close()
        if a.keep is not None:
            a.keep.mkdir(parents=True, exist_ok=True)
            for name in ("whole.mp4", "ranged.mp4"):
                shutil.copyfile(d / name, a.keep / name)
    print(f"{a.seconds:g} s clip, 25 fps, tiny models, {a.steps} steps, CPU; ranges {a.ranges}")
    print(f"{'seconds':<12}{'whole':>10}{'ranged':>10}{'share':>9}")
    for key in ("plan", "render", *SHOWN):
        share = ranged[key] / whole[key] if whole[key] else float("nan")
        print(f"{key:<12}{whole[key]:>10.2f}{ranged[key]:>10.2f}{share:>8.1%}")
    model = sum(ranged[k] for k in MODEL) / sum(whole[k] for k in MODEL)
    print(f"synthesis with the ranges as a share of the whole run's (target <= 20 %):\n"
          f"  model work ({' + '.join(MODEL)}, busy seconds): {model:.1%}\n"
          f"  render wall (also decoding and encoding every output frame): "
          f"{ranged['render'] / whole['render']:.1%}\n"
          f"planning with the ranges (face pass from shortly before the first range, Whisper where read): "
          f"{ranged['plan'] / whole['plan']:.1%}")


if __name__ == "__main__":
    main()
