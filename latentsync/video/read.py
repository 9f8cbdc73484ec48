"""Reading frames: RGB frames at a constant processing rate from any frame index, one ffmpeg process streaming.

Nothing here holds more than a frame or two, so memory does not grow with the length of the video (upstream kept
every frame in RAM). A seek is checked to land at or before the frame asked for, so that a read from any index gives
the same frames as a read from the start.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Generator
from fractions import Fraction
from pathlib import Path

import numpy as np

from latentsync import media
from latentsync.errors import InputError
from latentsync.options import check_file
from latentsync.video.probe import VideoInfo, exact_rate, probe

log = logging.getLogger(__name__)

# Demuxers whose backward seek reliably lands on a keyframe at or before the target. Elsewhere (MPEG-TS/PS,
# AVI without index, raw streams) a seek can land after the target, so those are decoded from the start.
_SEEKABLE_FORMATS = ("mov", "mp4", "matroska", "webm")
# Seconds decoded before a seek target at first, so that B-frame reordering rarely needs a second try.
_SEEK_MARGIN_S = 1.0
# YUV→RGB with plain swscale rounding darkens every frame by about one level (mean error 2.5 → 2.2 levels and
# no bias on a round trip with these); costs ≈ 3× the CPU of the plain conversion (≈ 20 ms a 1080p frame).
_SWS_FLAGS = "accurate_rnd+full_chroma_int"

_url = media.file_url
_last_line = media.last_line


def _first_slot(path: Path, rate: Fraction, seek: float = 0.0) -> int | None:
    """Constant-rate slot (timestamp in 1/rate units) of the first frame decoded after a fast seek to ``seek``."""
    cmd = media.ffmpeg_command("-nostats", loglevel="info")
    if seek > 0:
        cmd += ["-noaccurate_seek", "-ss", f"{seek:.6f}"]
    cmd += ["-copyts", *media.safe_input_args(), "-i", _url(path), "-map", "0:V:0", "-an", "-sn", "-dn",
            "-vf", f"{_fps_filter(rate)},showinfo", "-frames:v", "1", "-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False,
                          env=media.ffmpeg_env())
    found = re.search(rb"\bpts:\s*(-?[0-9]+)", proc.stderr)
    return int(found.group(1)) if proc.returncode == 0 and found else None


def _frame0_slot(path: Path, rate: Fraction) -> int | None:
    """Slot of frame 0: where a read from the start begins (cached; a block-wise reader asks often)."""
    stat = path.stat()
    return _frame0_slot_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, rate)


@functools.lru_cache(maxsize=64)
def _frame0_slot_cached(path: str, size: int, mtime_ns: int, rate: Fraction) -> int | None:
    return _first_slot(Path(path), rate)


def _fps_filter(rate: Fraction) -> str:
    # Without start_time the fps filter maps every frame to round(pts·rate) on the absolute timeline and emits,
    # for each slot, the last frame mapped at or before it; that mapping does not depend on where decoding
    # began, which is what makes a seeked read agree with a read from the start.
    return f"fps=fps={rate.numerator}/{rate.denominator}"


def _decode_args(path: Path, info: VideoInfo, rate: Fraction, start: int) -> list[str]:
    """ffmpeg arguments that decode frames ``start``… of the constant-rate stream (up to the filter output)."""
    args, vf = [], _fps_filter(rate)
    if start > 0:
        first = _frame0_slot(path, rate)
        if first is None:
            raise InputError(f"video {path.name!r} contains no decodable video frames")
        wanted = first + start
        seek = _seek_point(path, info, rate, wanted)
        if seek > 0:
            args += ["-noaccurate_seek", "-ss", f"{seek:.6f}"]
        vf += f",select='gte(pts,{wanted})'"
    args += ["-copyts", *media.safe_input_args(), "-i", _url(path), "-map", "0:V:0", "-an", "-sn", "-dn"]
    return args + ["-vf", vf]


def _seek_point(path: Path, info: VideoInfo, rate: Fraction, wanted: int) -> float:
    """A fast-seek position (seconds from the file start) after which decoding reaches slot ``wanted`` intact.

    A fast seek lands on a keyframe chosen by decode time; everything after it is decoded, so the seek is good
    when that keyframe's slot is not after ``wanted``. With B-frames (and by far, after a gap in a variable-
    rate stream) the keyframe can be shown after the target, so each seek is checked and moved earlier. 0 = none.
    """
    if not any(name in _SEEKABLE_FORMATS for name in info.format_name.split(",")):
        return 0.0
    # -ss counts from the start of the file, which is never after the video's start: this errs early.
    target = float(wanted / rate) - info.start_time
    margin = _SEEK_MARGIN_S
    seek = target - margin
    for _ in range(4):
        if seek <= 0:
            return 0.0
        slot = _first_slot(path, rate, seek)
        if slot is not None and slot <= wanted:
            return seek
        overshoot = float((slot - wanted) / rate) if slot is not None else 0.0
        margin *= 4
        seek -= overshoot + margin
    return 0.0


def read_frames(path: str | os.PathLike, fps: float | None = None, *, start: int = 0, count: int | None = None,
                info: VideoInfo | None = None) -> Generator[np.ndarray, None, None]:
    """Yield RGB uint8 (H, W, 3) frames ``start`` … ``start+count-1`` of the video resampled to constant ``fps``.

    ``fps=None`` keeps the source's average rate. Rotation metadata is applied. One ffmpeg process decodes and
    is killed when the iterator is closed or dropped early; reading past the end just stops. A video that stops
    decoding well before the length its container states (a truncated file) is read as far as it goes, with a
    warning saying how many frames of how many were read.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    path = Path(path)
    info = info or probe(path)  # the probe checks the file: a caller holding the probe had it checked
    rate = exact_rate(fps if fps is not None else info.fps)
    if count == 0:
        return _no_frames()
    width, height = info.width, info.height
    cmd = media.ffmpeg_command(*_decode_args(path, info, rate, start))
    # A fixed output size keeps the byte stream framed even if the source changes size mid-stream.
    cmd[-1] += f",scale={width}:{height}:flags={_SWS_FLAGS},format=rgb24"
    if count is not None:
        cmd += ["-frames:v", str(count)]
    # rawvideo (like null) has no timestamps, so ffmpeg passes the fps filter's frames through untouched.
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    # Checks above run now; ffmpeg starts at the first next() and is reaped when the generator ends or is dropped.
    return _stream(cmd, path, width, height, start=start, count=count, expected=expected_frames(info, rate))


def expected_frames(info: VideoInfo, fps: float | Fraction | None = None) -> int:
    """How many frames ``read_frames`` should give at ``fps`` (default: the source's rate), from the container."""
    rate = exact_rate(fps if fps is not None else info.fps)
    if abs(float(rate) - info.fps) < 1e-6:
        return info.frame_count
    return max(1, round(info.duration * rate))


def _no_frames() -> Generator[np.ndarray, None, None]:
    """An empty read: a generator like any other, so that callers may close it."""
    yield from ()


def _stream(cmd: list[str], path: Path, width: int, height: int, *, start: int, count: int | None,
            expected: int) -> Generator[np.ndarray, None, None]:
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        log.debug("decoding %s: %s", path.name, cmd)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                env=media.ffmpeg_env())
        # stdout=PIPE with the default bufsize: Popen opens the pipe as an io.BufferedReader.
        stdout = proc.stdout
        assert isinstance(stdout, io.BufferedIOBase)
        produced = 0
        try:
            while True:
                buf = bytearray(frame_bytes)
                view, got = memoryview(buf), 0
                while got < frame_bytes:
                    n = stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got == 0:
                    break
                if got < frame_bytes:
                    raise RuntimeError(f"ffmpeg ended mid-frame while decoding {path.name!r}")
                produced += 1
                yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)
            returncode = proc.wait()
            errors.seek(0)
            stderr = errors.read()
            if returncode < 0:  # killed by a signal: ffmpeg crashed, which is not the file's fault
                raise RuntimeError(f"ffmpeg crashed (signal {-returncode}) decoding {path.name!r}")
            if returncode != 0:
                check_file("video", path)  # a file gone or emptied since it was probed is said as such
                reason = _last_line(stderr, f"exit status {returncode}")
                raise InputError(f"video {path.name!r} could not be decoded ({reason})")
            if produced == 0 and start == 0:
                raise InputError(f"video {path.name!r} contains no decodable video frames")
            if count is None or produced < count:  # the decoder reached the end of what it could read
                _warn_if_cut_short(path, start + produced, expected)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stdout.close()


# Frames a decode may end short of the container's count without a warning: the frame-rate conversion rounds
# at the end, and a variable-rate stream's stated duration is approximate.
_SHORT_READ_SLACK = 2
_warned_short: set[tuple[str, int, int]] = set()


def _warn_if_cut_short(path: Path, read: int, expected: int) -> None:
    if read >= expected - max(_SHORT_READ_SLACK, expected // 100):
        return
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _warned_short:  # a block-wise reader reaches the end more than once
        return
    _warned_short.add(key)
    log.warning("video %r stopped decoding after %d of the %d frames its container states (truncated or "
                "damaged file?); processing the %d frames read", path.name, read, expected, read)
