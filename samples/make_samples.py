"""Build the bundled samples from offline sources: ``face.mp4`` (a real face, gently moving) and ``speech.wav``.

    .venv/bin/python samples/make_samples.py [--check]

face.mp4: the astronaut portrait shipped with scikit-image (Eileen Collins, NASA, public domain), head region
enlarged so the face is about 200 px wide in a 512×512 frame, with small smooth translation, rotation and
scale; 5 s at 25 fps, H.264 through ``latentsync.video.VideoWriter``.
speech.wav: two sentences from espeak-ng (en-us, 22.05 kHz mono), slightly longer than the video so that the
pipeline's ping-pong looping is exercised.
Both are deterministic for a given ffmpeg/espeak-ng build. ``--check`` runs MediaPipe face mesh on a few frames.
"""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from latentsync import video

HERE = Path(__file__).resolve().parent
SIZE = 512
FPS = 25
SECONDS = 5.0
FACE_CENTRE = (224.0, 128.0)  # between the eyes and the mouth in astronaut(), in source pixels
ZOOM = 2.15  # the face (≈ 92 px wide in the source) becomes ≈ 200 px wide
TEXT = "Hello there. This is a short test of lip sync. Watch the mouth follow my words."


def face_frame(t: float, portrait: np.ndarray) -> np.ndarray:
    """The portrait at time ``t`` s: zoomed on the face, with a small, smooth head sway."""
    dx = 6.0 * math.sin(2 * math.pi * t / 3.1)
    dy = 4.0 * math.sin(2 * math.pi * t / 4.3 + 1.0)
    angle = 2.5 * math.sin(2 * math.pi * t / 3.7)
    scale = ZOOM * (1.0 + 0.03 * math.sin(2 * math.pi * t / 5.0 + 0.5))
    matrix = cv2.getRotationMatrix2D(FACE_CENTRE, angle, scale)
    # Move the face centre to slightly above the middle of the output frame, then sway.
    matrix[:, 2] += (SIZE / 2 - FACE_CENTRE[0] + dx, SIZE * 0.45 - FACE_CENTRE[1] + dy)
    return cv2.warpAffine(portrait, matrix, (SIZE, SIZE), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)


def make_face(path: Path) -> None:
    portrait = data.astronaut()
    with video.VideoWriter(path, FPS, SIZE, SIZE, crf=18, preset="slow") as writer:
        for i in range(round(SECONDS * FPS)):
            writer.write(face_frame(i / FPS, portrait))


def make_speech(path: Path) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is needed (apt-get install espeak-ng)")
    subprocess.run([espeak, "-v", "en-us", "-s", "160", "-w", str(path), TEXT], check=True)


def check_face(path: Path) -> None:
    import mediapipe as mp

    info = video.probe(path)
    picks = {0, info.frame_count // 2, info.frame_count - 1}
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        for index, frame in enumerate(video.read_frames(path)):
            if index not in picks:
                continue
            found = mesh.process(frame).multi_face_landmarks
            if not found:
                raise SystemExit(f"face mesh found no face in frame {index}")
            xs = [p.x * info.width for p in found[0].landmark]
            print(f"frame {index}: face found, {max(xs) - min(xs):.0f} px wide")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify with MediaPipe that the face is found")
    args = parser.parse_args()
    make_face(HERE / "face.mp4")
    make_speech(HERE / "speech.wav")
    for name in ("face.mp4", "speech.wav"):
        print(f"{name}: {(HERE / name).stat().st_size / 1024:.0f} KiB")
    if args.check:
        check_face(HERE / "face.mp4")


if __name__ == "__main__":
    main()
