"""Which frames pass 1 edits on real media: face-less natural images, a turned face and small faces in 1080p.

Each clip is a skimage image scaled to 1920×1080 (or a face pasted into a grey 1080p frame at a given width),
drifting a few pixels a frame, encoded with libx264. Prints, per clip, the frames with the face (the frames an
edit touches, fades included) and the shortest run of them.

    .venv/bin/python benchmarks/face_filter_bench.py [--frames 50]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from latentsync import video as video_mod  # noqa: E402
from latentsync.control import StageClock  # noqa: E402
from latentsync.errors import InputError  # noqa: E402
from latentsync.tracking import FaceTrack  # noqa: E402
from media_utils import face_clip, write_clip  # noqa: E402

W, H = 1920, 1080
ASTRONAUT_FACE = 0.184  # the astronaut's face (mesh width) over the image's height


def scene(img: np.ndarray, n: int) -> list[np.ndarray]:
    """``img`` stretched to a little over 1080p, a 1080p window drifting over it."""
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    big = cv2.resize(img, (W + 40, H + 24), interpolation=cv2.INTER_CUBIC)
    return [np.ascontiguousarray(big[int(12 + 5 * np.cos(t / 4)):][:H, int(20 + 8 * np.sin(t / 3)):][:, :W])
            for t in range(n)]


def small_face(width: int, n: int) -> list[np.ndarray]:
    """The astronaut with a face ``width`` px wide in a grey 1080p frame, drifting."""
    from skimage.data import astronaut

    h = round(width / ASTRONAUT_FACE)
    face = cv2.resize(astronaut(), (h, h), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(n):
        canvas = np.full((H, W, 3), 100, np.uint8)
        m = np.float32([[1, 0, 600 + 3 * np.sin(t / 5) * h / 100], [0, 1, 300 + 2 * np.cos(t / 7) * h / 100]])
        frames.append(cv2.warpAffine(face, m, (W, H), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT))
    return frames


def runs(has_face: np.ndarray) -> list[int]:
    out, run = [], 0
    for h in [*has_face, False]:
        if h:
            run += 1
        elif run:
            out, run = [*out, run], 0
    return out


def edited(path: Path) -> tuple[int, int, list[int]]:
    info = video_mod.probe(path)
    with FaceTrack.open(path, 25.0, info, None, None, 256, clock=StageClock()) as track:
        track.ensure(float("inf"))
        try:
            track.check()
        except InputError:
            pass
    _, has_face = track.arrays()
    return len(has_face), int(has_face.sum()), runs(has_face)


def main() -> None:
    from skimage import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    n = parser.parse_args().frames
    with tempfile.TemporaryDirectory() as tmp:
        clips = {name: lambda name=name: scene(getattr(data, name)(), n)
                 for name in ("rocket", "coffee", "chelsea", "camera")}
        clips.update({f"astronaut {w} px": lambda w=w: small_face(w, n) for w in (30, 40, 50)})
        for name, make in clips.items():
            path = write_clip(Path(tmp) / "clip.mp4", make())
            frames, with_face, lengths = edited(path)
            print(f"{name:18s} {with_face:3d} of {frames} frames with the face, runs {lengths}", flush=True)
        frames, with_face, lengths = edited(face_clip(Path(tmp) / "face.mp4", n))
        print(f"{'face_clip 320x240':18s} {with_face:3d} of {frames} frames with the face, runs {lengths}")


if __name__ == "__main__":
    main()
