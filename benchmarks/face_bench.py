"""Face-path speed on the CPU: landmarks + align + restore per frame, next to ffmpeg's decode of the same clip.

The clip is skimage's astronaut scaled to the frame height, centred in a 720p / 1080p frame, drifting a few pixels
per frame, encoded with libx264. Prints frames per second for each stage and for the whole face path.

    .venv/bin/python benchmarks/face_bench.py [--frames 50] [--resolution 512]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentsync.align import FaceAligner  # noqa: E402
from latentsync.face import FaceTracker  # noqa: E402
from latentsync.media import ffmpeg_exe  # noqa: E402


def make_frames(width: int, height: int, n: int) -> list[np.ndarray]:
    from skimage import data

    face = cv2.resize(data.astronaut(), (height, height), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(n):
        canvas = np.full((height, width, 3), 100, np.uint8)
        m = np.float32([[1, 0, (width - height) / 2 + 3 * np.sin(t / 5) * height / 100],
                        [0, 1, 2 * np.cos(t / 7) * height / 100]])
        frames.append(cv2.warpAffine(face, m, (width, height), dst=canvas, borderMode=cv2.BORDER_TRANSPARENT))
    return frames


def encode(frames: list[np.ndarray], path: Path) -> None:
    h, w = frames[0].shape[:2]
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", "25", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", str(path)]
    subprocess.run(cmd, input=b"".join(f.tobytes() for f in frames), check=True)


def decode_fps(path: Path, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-f", "null", "-"], check=True)
        best = min(best, time.perf_counter() - start)
    return n / best


def face_path_fps(frames: list[np.ndarray], resolution: int) -> dict[str, tuple[float, float]]:
    """Per stage: (fps from the total time, fps from the median frame time — robust to a busy shared machine)."""
    tracker = FaceTracker()
    aligner = FaceAligner(resolution)
    tracker.track(frames[0])  # warm-up: graph start-up is not per-frame cost
    tracker.reset()
    spent: dict[str, list[float]] = {"landmarks": [], "align": [], "restore": []}
    for frame in frames:
        t0 = time.perf_counter()
        face = tracker.track(frame)
        t1 = time.perf_counter()
        if face is None:
            raise RuntimeError("the benchmark clip lost the face")
        aligned, matrix = aligner.align(frame, face.anchors)
        t2 = time.perf_counter()
        generated = torch.from_numpy(aligned).permute(2, 0, 1).float() / 127.5 - 1
        aligner.restore(frame, generated, matrix)
        t3 = time.perf_counter()
        spent["landmarks"].append(t1 - t0)
        spent["align"].append(t2 - t1)
        spent["restore"].append(t3 - t2)
    spent["total"] = [sum(x) for x in zip(*spent.values(), strict=True)]
    return {k: (len(v) / sum(v), 1 / float(np.median(v))) for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512, help="model resolution R (256 or 512)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, R={args.resolution}, {args.frames} frames")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h) in {"720p": (1280, 720), "1080p": (1920, 1080)}.items():
            frames = make_frames(w, h, args.frames)
            clip = Path(tmp) / f"{name}.mp4"
            encode(frames, clip)
            fps = face_path_fps(frames, args.resolution)
            stages = ", ".join(f"{k} {a:.1f} ({m:.1f})" for k, (a, m) in fps.items())
            print(f"{name}: face path fps, overall (median frame): {stages}; "
                  f"ffmpeg decode {decode_fps(clip, args.frames):.1f} fps")


if __name__ == "__main__":
    main()
