"""Throughput of latentsync.video against plain ffmpeg, on 10 s testsrc2 clips at 720p and 1080p.

    .venv/bin/python benchmarks/video_bench.py [--seconds 10] [--sizes 1280x720 1920x1080]

Prints, per size: decode fps (read_frames at 25 fps, RGB frames into Python; beside it plain ffmpeg decoding to
rgb24 into /dev/null), encode fps (VideoWriter, CRF 18,
frames from memory), our decode→encode wall time against a plain ``ffmpeg -i clip -c:v libx264 -crf 18 out.mp4``
(the ratio is the I/O overhead the pipeline adds), the time to read a 16-frame block at the end (seek) against
reading the whole clip, and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from latentsync import media, video


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench(size: str, seconds: float, folder: Path) -> None:
    width, height = map(int, size.split("x"))
    clip = folder / f"clip_{size}.mp4"
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=s={size}:r=25:d={seconds}", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
                    "-g", "50",  # a keyframe every 2 s, as phones and cameras write
                    "-pix_fmt", "yuv420p", str(clip)], check=True)
    info = video.probe(clip)
    frames = info.frame_count

    count, t_decode = timed(lambda: sum(1 for _ in video.read_frames(clip, 25, info=info)))
    assert count == frames, (count, frames)

    _, t_plain_decode = timed(lambda: subprocess.run(
        [media.ffmpeg_exe(), "-v", "error", "-i", str(clip), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True, stdout=subprocess.DEVNULL))

    cache = list(itertools.islice(video.read_frames(clip, 25, info=info), 25))

    def encode():
        with video.VideoWriter(folder / "enc.mp4", 25, width, height) as writer:
            for i in range(frames):
                writer.write(cache[i % len(cache)])

    _, t_encode = timed(encode)

    def transcode():
        with video.VideoWriter(folder / "ours.mp4", 25, width, height) as writer:
            for frame in video.read_frames(clip, 25, info=info):
                writer.write(frame)

    _, t_ours = timed(transcode)
    _, t_plain = timed(lambda: subprocess.run([media.ffmpeg_exe(), "-v", "error", "-y", "-i", str(clip), "-c:v",
                                               "libx264", "-crf", "18", str(folder / "plain.mp4")], check=True))
    block, t_block = timed(lambda: list(video.read_frames(clip, 25, start=frames - 16, count=16, info=info)))
    assert len(block) == 16

    print(f"{size}: {frames} frames")
    print(f"  decode  read_frames            {frames / t_decode:7.1f} fps  ({t_decode:.2f} s; plain ffmpeg to "
          f"rgb24 {frames / t_plain_decode:.1f} fps)")
    print(f"  encode  VideoWriter crf 18     {frames / t_encode:7.1f} fps  ({t_encode:.2f} s)")
    print(f"  decode+encode  ours {t_ours:.2f} s   plain ffmpeg {t_plain:.2f} s   ratio {t_ours / t_plain:.2f}")
    print(f"  last 16-frame block {t_block:.2f} s   (whole-clip decode {t_decode:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sizes", nargs="+", default=["1280x720", "1920x1080"])
    args = parser.parse_args()
    subprocess.run([media.ffmpeg_exe(), "-version"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            bench(size, args.seconds, Path(tmp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB (includes the 25 cached frames of the encode test)")


if __name__ == "__main__":
    main()
