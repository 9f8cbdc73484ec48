"""Pipeline speed and memory on CPU with tiny random models (the real pipeline code, toy-sized networks).

    .venv/bin/python benchmarks/pipeline_bench.py             # 1080p 30 s speed + 720p 10 s / 60 s peak RSS
    .venv/bin/python benchmarks/pipeline_bench.py --memory 10 60 120
    .venv/bin/python benchmarks/pipeline_bench.py --skip-speed --memory --overlap 10   # the overlap figure

Prints busy seconds per stage, the total divided by a plain ffmpeg decode + x264 encode of the same clip, and the peak
resident memory of a fresh process per clip length (the memory rule: 60 s within 1.15× of 10 s). ``--overlap S``
runs S seconds of 720p with the stages concurrent and serial: wall, and busy seconds summed over the wall (the
concurrent stages aim at ≥ 1.3 on a CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # this checkout first

from latentsync.media import ffmpeg_exe  # noqa: E402


def make_clip(path: Path, seconds: float, width: int, height: int, fps: int = 25) -> Path:
    """A real face (the astronaut) moving gently inside a ``width``×``height`` frame, encoded with x264."""
    import cv2
    from skimage.data import astronaut

    face = astronaut()[0:300, 80:380]
    scale = height / 600
    face = cv2.resize(face, None, fx=scale * 1.6, fy=scale * 1.6, interpolation=cv2.INTER_CUBIC)
    n = int(seconds * fps)
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-preset", "veryfast",
           "-crf", "18", "-pix_fmt", "yuv420p", str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    bg = np.tile(np.linspace(40, 200, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
    fh, fw = face.shape[:2]
    for i in range(n):
        frame = bg.copy()
        x = (width - fw) // 2 + int(12 * np.sin(i / 20))
        y = (height - fh) // 2 + int(6 * np.cos(i / 15))
        frame[y:y + fh, x:x + fw] = face
        proc.stdin.write(frame.tobytes())
    proc.stdin.close()
    proc.wait()
    return path


def make_speech(path: Path, seconds: float) -> Path:
    from media_utils import speech

    return speech(path, seconds)


def ffmpeg_baseline(clip: Path, out: Path) -> float:
    """Wall time of a plain decode + x264 (CRF 18) encode of the clip: the floor any video tool pays."""
    t0 = time.perf_counter()
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-i", str(clip), "-c:v", "libx264",
                    "-crf", "18", "-pix_fmt", "yuv420p", "-an", str(out)], check=True)
    return time.perf_counter() - t0


def run_once(clip: Path, audio: Path, out: Path, weights: Path, cfg: Path, steps: int, serial: bool = False) -> dict:
    """One pipeline run in this process; returns the result's figures and this process's peak RSS."""
    from latentsync.pipeline import LipSync

    pipe = LipSync.from_pretrained(weights, unet_config=cfg, syncnet_config=weights / "syncnet.yaml", device="cpu")
    pipe.serial = serial
    t0 = time.perf_counter()
    result = pipe.lipsync(clip, audio, out, inference_steps=steps, seed=0, loop_mode="cut_off")
    wall = time.perf_counter() - t0
    return {"wall": wall, "frames": result.frames, "seconds": result.seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args) -> None:
    figures = run_once(Path(args.clip), Path(args.audio), Path(args.out), Path(args.weights), Path(args.cfg),
                       args.steps, args.serial)
    print("RESULT " + json.dumps(figures))


def in_subprocess(clip, audio, out, weights, cfg, steps, serial=False) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", "--clip", str(clip), "--audio", str(audio),
                           "--out", str(out), "--weights", str(weights), "--cfg", str(cfg), "--steps", str(steps),
                           *(["--serial"] if serial else [])],
                          capture_output=True, text=True, check=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[7:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--clip"), p.add_argument("--audio"), p.add_argument("--out")
    p.add_argument("--weights"), p.add_argument("--cfg")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--speed-seconds", type=float, default=30.0)
    p.add_argument("--memory", type=float, nargs="*", default=[10.0, 60.0])
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--serial", action="store_true", help="run the synthesis stages one after another")
    p.add_argument("--overlap", type=float, default=0.0, help="seconds of 720p for the overlap figure (0: skip)")
    args = p.parse_args()
    if args.child:
        return child(args)

    from tiny_weights import make_tiny_weights

    with tempfile.TemporaryDirectory(prefix="latentsync-bench-") as tmp:
        tmp = Path(tmp)
        weights, cfg = make_tiny_weights(tmp / "weights")
        if not args.skip_speed:
            clip = make_clip(tmp / "speed.mp4", args.speed_seconds, 1920, 1080)
            audio = make_speech(tmp / "speed.wav", args.speed_seconds)
            base = ffmpeg_baseline(clip, tmp / "baseline.mp4")
            r = in_subprocess(clip, audio, tmp / "speed_out.mp4", weights, cfg, args.steps)
            print(f"1080p {args.speed_seconds:g} s, tiny models, {args.steps} steps, CPU: {r['frames']} frames")
            for stage, sec in sorted(r["seconds"].items(), key=lambda kv: -kv[1]):
                print(f"  {stage:>14}: {sec:8.2f} s")
            print(f"  pipeline wall {r['wall']:.1f} s; ffmpeg decode+x264 {base:.1f} s; ratio {r['wall'] / base:.2f}x")
        if args.overlap:
            clip = make_clip(tmp / "overlap.mp4", args.overlap, 1280, 720)
            audio = make_speech(tmp / "overlap.wav", args.overlap)
            for serial in (False, True):
                r = in_subprocess(clip, audio, tmp / "overlap_out.mp4", weights, cfg, 2, serial)
                busy = sum(v for k, v in r["seconds"].items() if k != "wall")
                mode = "serial" if serial else "concurrent"
                print(f"720p {args.overlap:g} s, {mode}: wall {r['seconds']['wall']:.1f} s,"
                      f" busy {busy:.1f} s = {busy / r['seconds']['wall']:.2f}x the wall; {r['seconds']}")
        peaks = {}
        for seconds in args.memory:
            clip = make_clip(tmp / f"mem{seconds:g}.mp4", seconds, 1280, 720)
            audio = make_speech(tmp / f"mem{seconds:g}.wav", seconds)
            r = in_subprocess(clip, audio, tmp / f"mem{seconds:g}_out.mp4", weights, cfg, 2)
            peaks[seconds] = r["peak_rss_mb"]
            print(f"720p {seconds:g} s: {r['frames']} frames, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"wall {r['wall']:.1f} s")
        if len(peaks) > 1:
            first = peaks[min(peaks)]
            for seconds, peak in sorted(peaks.items()):
                print(f"  peak RSS {seconds:g} s / {min(peaks):g} s = {peak / first:.3f}")


if __name__ == "__main__":
    main()
