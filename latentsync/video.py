"""Video in and out through ffmpeg subprocesses, one frame at a time.

``probe`` checks a user's video before any work (format, size and duration caps); ``read_frames`` streams RGB
frames at a constant processing rate from any frame index; ``VideoWriter`` streams RGB frames into H.264;
``mux_audio`` puts the user's own audio beside the finished video. Nothing here holds more than a frame or two,
so memory does not grow with the length of the video (upstream kept every frame in RAM: issues #45, #248).
Every ffmpeg/ffprobe call that opens a user file goes through ``media.safe_input_args`` and a ``file:`` URL, so
playlists and other protocols are refused and odd file names (spaces, quotes, ``$(…)``, a leading ``-``) are
plain names.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from latentsync import media
from latentsync.errors import InputError

log = logging.getLogger(__name__)

# Demuxers whose backward seek reliably lands on a keyframe at or before the target. Elsewhere (MPEG-TS/PS,
# AVI without index, raw streams) a seek can land after the target, so those are decoded from the start.
_SEEKABLE_FORMATS = ("mov", "mp4", "matroska", "webm")
# Seconds decoded before a seek target at first, so that B-frame reordering rarely needs a second try.
_SEEK_MARGIN_S = 1.0
# YUV→RGB with plain swscale rounding darkens every frame by about one level (mean error 2.5 → 2.2 levels and
# no bias on a round trip with these); costs ≈ 3× the CPU of the plain conversion (≈ 20 ms a 1080p frame).
_SWS_FLAGS = "accurate_rnd+full_chroma_int"


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` learnt about a video; sizes are as displayed (after rotation)."""

    width: int
    height: int
    rotation: int  # counter-clockwise degrees applied for display (ffprobe's display-matrix convention)
    fps: float  # average frame rate of the source
    frame_count: int  # source frames; duration·fps when the container does not say
    duration: float  # seconds
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    format_name: str
    start_time: float = 0.0  # timestamp of the video stream's first frame, seconds


def _url(path: str | os.PathLike) -> str:
    # "file:" keeps names such as "-x.mp4", "http:foo.mp4" or "a|b" from being read as options or protocols.
    return "file:" + os.path.abspath(os.fspath(path))


def _rate(fps: float) -> Fraction:
    """A frame rate as an exact fraction (29.97… → 30000/1001), the form ffmpeg options take without drift."""
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(float(fps))
    except (TypeError, ValueError, OverflowError):
        rate = None
    if rate is None or rate <= 0:
        raise ValueError(f"frame rate must be a positive number, got {fps!r}")
    return rate.limit_denominator(1_000_000)


def _ratio(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    num, _, den = text.partition("/")
    try:
        return float(Fraction(int(num), int(den or 1))) if int(den or 1) else 0.0
    except ValueError:
        return 0.0


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _last_line(stderr: bytes, fallback: str) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else fallback


def _check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path.name!r} is empty (0 bytes)")
    return path


def _refused_format(what: str, path: Path) -> str:
    return (f"{what} {path.name!r} is not in an accepted format: playlists (HLS, concat lists), images and image "
            f"sequences are refused; upload a single ordinary media file such as MP4, MOV, MKV or WebM")


def _ffprobe(path: Path, what: str, *extra: str) -> dict:
    """ffprobe's JSON about one user file, opened under the same restrictions as ffmpeg's reads."""
    exe = media.ffprobe_exe()
    if exe is None:
        raise RuntimeError("ffprobe was not found; install ffmpeg (with ffprobe) or set LATENTSYNC_FFMPEG")
    cmd = [exe, "-v", "error", *media.safe_input_args(), *extra, "-of", "json", "-i", _url(path)]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace")
        if "not on whitelist" in stderr:
            raise InputError(_refused_format(what, path))
        detail = _last_line(proc.stderr, "ffprobe failed").replace(f"{_url(path)}: ", "")
        raise InputError(f"{what} {path.name!r} is not a readable media file ({detail})")
    try:
        return json.loads(proc.stdout or b"{}")
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"ffprobe gave unparsable output for {path.name!r}") from exc


def _rotation(stream: dict) -> int:
    """Counter-clockwise display rotation in {0, 90, 180, 270}, from the display matrix or the old rotate tag."""
    angle = None
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            angle = _number(side["rotation"])
            break
    if angle is None:
        tag = _number((stream.get("tags") or {}).get("rotate"))
        angle = -tag if tag is not None else 0.0  # the old tag counts clockwise
    return int(round(angle / 90.0)) % 4 * 90


def _scan_duration(path: Path, fps: float) -> float:
    """Duration of the first video stream from its packets, for containers that state none (live WebM, raw H.264)."""
    data = _ffprobe(path, "video", "-select_streams", "V:0", "-show_entries", "packet=pts_time,duration_time")
    packets = data.get("packets") or []
    spans = [(_number(p.get("pts_time")), _number(p.get("duration_time")) or 1.0 / fps) for p in packets]
    spans = [(pts, length) for pts, length in spans if pts is not None]
    if not spans:  # raw streams carry no timestamps: one packet per frame
        return len(packets) / fps
    return max(pts + length for pts, length in spans) - min(pts for pts, _ in spans)


def probe(path: str | os.PathLike, *, max_side: int = media.MAX_SIDE_PX,
          max_duration: float = media.MAX_DURATION_S) -> VideoInfo:
    """Describe a user's video, refusing what cannot or should not be processed with an InputError."""
    path = _check_file(path, "video")
    data = _ffprobe(path, "video", "-show_format", "-show_streams")
    fmt = data.get("format") or {}
    format_name = str(fmt.get("format_name", ""))
    # Defence in depth: ffprobe has already refused other demuxers, but never trust one switch alone.
    if not set(format_name.split(",")) & set(media.ALLOWED_DEMUXERS):
        raise InputError(_refused_format("video", path))

    streams = data.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    if video is None:
        raise InputError(f"{path.name!r} has no video stream (is it an audio file or an image?); upload a video")
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)

    coded_w, coded_h = int(video.get("width") or 0), int(video.get("height") or 0)
    if coded_w <= 0 or coded_h <= 0:
        raise InputError(f"video {path.name!r}: the video stream has no picture size (damaged file?)")
    rotation = _rotation(video)
    width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    if max(width, height) > max_side:
        raise InputError(
            f"video {path.name!r} is {width}x{height}; the limit is {max_side} pixels on either side. Downscale it, "
            f"or raise the limit with the environment variable LATENTSYNC_MAX_SIDE or the max_side argument"
        )

    fps = _ratio(video.get("avg_frame_rate")) or _ratio(video.get("r_frame_rate"))
    if fps <= 0:
        raise InputError(f"video {path.name!r}: the frame rate cannot be determined (damaged file?)")
    nb_frames = int(video["nb_frames"]) if str(video.get("nb_frames", "")).isdigit() else None
    if nb_frames is None:
        # Matroska and others do not count frames; one packet read proves there is at least one.
        first = _ffprobe(path, "video", "-select_streams", "V:0", "-read_intervals", "%+#1",
                         "-show_entries", "packet=pts_time")
        nb_frames = None if first.get("packets") else 0
    if nb_frames == 0:
        raise InputError(f"video {path.name!r} contains no video frames")
    duration = _number(video.get("duration")) or _number(fmt.get("duration")) or 0.0
    if duration <= 0:
        duration = _scan_duration(path, fps)
    if duration <= 0:
        raise InputError(f"video {path.name!r} contains no video frames")
    if duration > max_duration:
        raise InputError(
            f"video {path.name!r} lasts {duration:.1f} s; the limit is {max_duration:g} s. Trim it, or raise the "
            f"limit with the environment variable LATENTSYNC_MAX_DURATION or the max_duration argument"
        )
    frame_count = nb_frames if nb_frames is not None else max(1, round(duration * fps))

    start = _number(video.get("start_time"))
    if start is None:
        start = _number(fmt.get("start_time")) or 0.0
    return VideoInfo(
        width=width, height=height, rotation=rotation, fps=fps, frame_count=frame_count, duration=duration,
        has_audio=audio is not None,
        audio_sample_rate=int(audio["sample_rate"]) if audio and str(audio.get("sample_rate", "")).isdigit() else None,
        audio_channels=int(audio["channels"]) if audio and audio.get("channels") else None,
        format_name=format_name, start_time=start,
    )


def _first_slot(path: Path, rate: Fraction, seek: float = 0.0) -> int | None:
    """Constant-rate slot (timestamp in 1/rate units) of the first frame decoded after a fast seek to ``seek``."""
    cmd = [media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats", "-loglevel", "info"]
    if seek > 0:
        cmd += ["-noaccurate_seek", "-ss", f"{seek:.6f}"]
    cmd += ["-copyts", *media.safe_input_args(), "-i", _url(path), "-map", "0:V:0", "-an", "-sn", "-dn",
            "-vf", f"{_fps_filter(rate)},showinfo", "-frames:v", "1", "-f", "null", "-"]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)
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
                info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 (H, W, 3) frames ``start`` … ``start+count-1`` of the video resampled to constant ``fps``.

    ``fps=None`` keeps the source's average rate. Rotation metadata is applied. One ffmpeg process decodes and
    is killed when the iterator is closed or dropped early; reading past the end just stops.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    path = _check_file(path, "video")
    info = info or probe(path)
    rate = _rate(fps if fps is not None else info.fps)
    if count == 0:
        return iter(())
    width, height = info.width, info.height
    cmd = [media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
           *_decode_args(path, info, rate, start)]
    # A fixed output size keeps the byte stream framed even if the source changes size mid-stream.
    cmd[-1] += f",scale={width}:{height}:flags={_SWS_FLAGS},format=rgb24"
    if count is not None:
        cmd += ["-frames:v", str(count)]
    # rawvideo (like null) has no timestamps, so ffmpeg passes the fps filter's frames through untouched.
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    # Checks above run now; ffmpeg starts at the first next() and is reaped when the generator ends or is dropped.
    return _stream(cmd, path, width, height, require_frames=start == 0)


def _stream(cmd: list[str], path: Path, width: int, height: int, require_frames: bool) -> Iterator[np.ndarray]:
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        log.debug("decoding %s: %s", path.name, cmd)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        produced = 0
        try:
            while True:
                buf = bytearray(frame_bytes)
                view, got = memoryview(buf), 0
                while got < frame_bytes:
                    n = proc.stdout.readinto(view[got:])
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
            if returncode != 0:
                raise InputError(f"video {path.name!r} could not be decoded ({_last_line(stderr, f'exit status {returncode}')})")
            if produced == 0 and require_frames:
                raise InputError(f"video {path.name!r} contains no decodable video frames")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def count_frames(path: str | os.PathLike, fps: float | None = None, *, info: VideoInfo | None = None) -> int:
    """Exact number of frames ``read_frames(path, fps)`` yields (decodes the whole video, converts nothing)."""
    path = _check_file(path, "video")
    info = info or probe(path)
    rate = _rate(fps if fps is not None else info.fps)
    cmd = [media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats",
           *_decode_args(path, info, rate, 0), "-f", "null", "-progress", "pipe:1", "-"]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise InputError(f"video {path.name!r} could not be decoded ({_last_line(proc.stderr, 'ffmpeg failed')})")
    frames = [line for line in proc.stdout.decode().splitlines() if line.startswith("frame=")]
    return int(frames[-1].split("=", 1)[1]) if frames else 0


def _temp_beside(path: Path) -> Path:
    """An unused hidden name in ``path``'s folder (same file system, so the final rename is atomic).

    ffmpeg creates the file itself, so it gets the usual permissions rather than mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.part{path.suffix or '.mp4'}")


class VideoWriter:
    """Stream RGB uint8 frames into an H.264 MP4 of exactly ``width`` × ``height``; use as a context manager.

    Even sizes are encoded yuv420p (plays everywhere). H.264 cannot store an odd width or height in 4:2:0 (its
    crop window moves in 2-pixel steps there), so an odd size is encoded yuv444p (High 4:4:4 profile): the size
    is kept exactly, at the price of players that only know 4:2:0 (browsers, QuickTime) refusing the file.
    The file appears at ``path`` only when ``close()`` succeeds; ``abort()`` kills ffmpeg and leaves nothing.
    """

    def __init__(self, path: str | os.PathLike, fps: float, width: int, height: int, *, crf: int = 18,
                 preset: str = "medium"):
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        rate = _rate(fps)
        pix_fmt = "yuv420p" if self.width % 2 == 0 and self.height % 2 == 0 else "yuv444p"
        if pix_fmt != "yuv420p":
            log.warning("odd frame size %dx%d: encoding H.264 4:4:4 to keep it exact; some players cannot play "
                        "4:4:4", self.width, self.height)
        self._tmp = _temp_beside(self.path)
        cmd = [
            media.ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
            "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0",
            # BT.709 matrix and tags: what players assume for HD, and what decoders honour when tagged.
            "-vf", "scale=out_color_matrix=bt709:out_range=tv",
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", pix_fmt,
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
            "-movflags", "+faststart", _url(self._tmp),
        ]
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors)
        self._done = False

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 (height, width, 3) frame."""
        if self._done:
            raise RuntimeError("write() on a closed VideoWriter")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame of shape {(self.height, self.width, 3)}, "
                             f"got {frame.dtype} {frame.shape}")
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except BrokenPipeError:
            self._proc.wait()
            message = self._stderr()
            self.abort()
            raise RuntimeError(f"ffmpeg stopped while encoding {self.path.name!r} ({message})") from None
        self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        if self._done:
            return self.path
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        returncode = self._proc.wait()
        if returncode != 0 or self.frames_written == 0:
            message = self._stderr() if returncode != 0 else "no frames were written"
            self.abort()
            raise RuntimeError(f"encoding {self.path.name!r} failed ({message})")
        self._done = True
        self._errors.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file."""
        if self._done:
            return
        self._done = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        self._errors.close()
        self._tmp.unlink(missing_ok=True)

    def _stderr(self) -> str:
        self._errors.seek(0)
        return _last_line(self._errors.read(), f"exit status {self._proc.returncode}")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        # A writer dropped without close() must not leave ffmpeg running or a temp file behind.
        if not getattr(self, "_done", True):
            self.abort()


def mux_audio(video_path: str | os.PathLike, audio_path: str | os.PathLike, out_path: str | os.PathLike, *,
              duration: float, audio_start: float = 0.0) -> Path:
    """Copy the video stream and add the user's audio (AAC, its own rate and channels), exactly ``duration`` s.

    Audio from ``audio_start`` seconds is trimmed, or padded with silence, to ``duration``, which should be the
    video's length (frames / fps): a longer video is cut there, but only at packet precision. The result is
    written beside ``out_path`` under a temporary name and renamed into place.
    """
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    if not (math.isfinite(audio_start) and audio_start >= 0):
        raise ValueError(f"audio_start must be >= 0 seconds, got {audio_start!r}")
    video_path = Path(video_path)
    audio_path = _check_file(audio_path, "audio")
    streams = _ffprobe(audio_path, "audio", "-show_streams", "-select_streams", "a:0").get("streams") or []
    if not streams:
        raise InputError(f"audio {audio_path.name!r} has no audio stream")
    channels = int(streams[0].get("channels") or 2)
    out_path = Path(out_path)
    tmp = _temp_beside(out_path)
    seek = ["-ss", f"{audio_start:.6f}"] if audio_start > 0 else []
    args = [
        "-y", *media.safe_input_args(), "-i", _url(video_path),
        *seek, *media.safe_input_args(), "-i", _url(audio_path),
        "-map", "0:V:0", "-map", "1:a:0", "-c:v", "copy",
        # No -ar/-ac: the encoder keeps the source's rate and channel count (a rate AAC lacks, e.g. 37.8 kHz,
        # becomes the nearest one it has).
        "-af", "apad", "-c:a", "aac", "-b:a", f"{min(64 * max(channels, 2), 512)}k",
        "-t", f"{duration:.6f}", "-movflags", "+faststart", _url(tmp),
    ]
    try:
        media.run_ffmpeg(args, what=f"muxing audio {audio_path.name!r}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
