"""Video in and out through ffmpeg subprocesses, one frame at a time.

``probe`` checks a user's video before any work (format, size and duration caps); ``read_frames`` streams RGB
frames at a constant processing rate from any frame index; ``VideoWriter`` streams RGB frames into H.264;
``mux_audio`` puts the user's own audio beside the finished video. Nothing here holds more than a frame or two,
so memory does not grow with the length of the video (upstream kept every frame in RAM: issues #45, #248).
Every ffmpeg call (and PyAV probe) that opens a user file is confined by ``media`` and given a ``file:`` URL, so
playlists and other protocols are refused and odd file names (spaces, quotes, ``$(…)``, a leading ``-``) are
plain names. What we write is checked after writing (frames present, disk not full) before it is moved into place.
"""
from __future__ import annotations

import functools
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
    rotation: int  # counter-clockwise degrees applied for display (FFmpeg's display-matrix convention)
    fps: float  # average frame rate of the source
    frame_count: int  # source frames; duration·fps when the container does not say
    duration: float  # seconds
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    format_name: str
    start_time: float = 0.0  # timestamp of the video stream's first frame, seconds


_url = media.file_url
_last_line = media.last_line
# Still-image codecs: a video stream of one of these without a frame rate is a cover picture (an MP3's or
# M4A's album art), not a video. (PyAV 13 does not expose FFmpeg's attached_pic disposition.)
_PICTURE_CODECS = ("mjpeg", "png", "bmp", "webp", "tiff", "gif", "jpegls")


def _rate(fps: float) -> Fraction:
    """A frame rate as an exact fraction (29.97… → 30000/1001), the form ffmpeg options take without drift."""
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(float(fps))
    except (TypeError, ValueError, OverflowError):
        rate = None
    if rate is None or rate <= 0:
        raise ValueError(f"frame rate must be a positive number, got {fps!r}")
    return rate.limit_denominator(1_000_000)


def _check_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path.name!r} is empty (0 bytes)")
    return path


def _seconds(value, time_base) -> float | None:
    """A stream timestamp or duration in seconds; None where the container does not say."""
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _is_picture(stream) -> bool:
    return stream.average_rate is None and stream.codec_context.name in _PICTURE_CODECS


def _rotation(stream) -> int:
    """Counter-clockwise display rotation in {0, 90, 180, 270}, from the display matrix or the old rotate tag."""
    angle = stream.side_data.get("DISPLAYMATRIX")
    if angle is None or not math.isfinite(angle):
        try:
            angle = -float(stream.metadata.get("rotate", 0))  # the old tag counts clockwise
        except ValueError:
            angle = 0.0
    return int(round(angle / 90.0)) % 4 * 90


def _packet_times(path: Path, limit: int | None = None) -> list[tuple[float | None, float | None]]:
    """(pts, duration) in seconds of the first ``limit`` (all) packets of the video stream, without decoding."""
    import av

    times = []
    with media.open_input(path, "video") as container:
        stream = next((s for s in container.streams.video if not _is_picture(s)), None)
        if stream is None:
            return times
        try:
            for packet in container.demux(stream):
                if packet.size:
                    times.append((_seconds(packet.pts, packet.time_base), _seconds(packet.duration, packet.time_base)))
                    if limit is not None and len(times) >= limit:
                        break
        except av.FFmpegError:  # a damaged tail: what was read so far is what there is
            pass
    return times


def _scan_duration(path: Path, fps: float) -> float:
    """Duration of the video stream from its packets, for containers that state none (live WebM, raw H.264)."""
    packets = _packet_times(path)
    spans = [(pts, length or 1.0 / fps) for pts, length in packets if pts is not None]
    if not spans:  # raw streams carry no timestamps: one packet per frame
        return len(packets) / fps
    return max(pts + length for pts, length in spans) - min(pts for pts, _ in spans)


def probe(path: str | os.PathLike, *, max_side: int = media.MAX_SIDE_PX,
          max_duration: float = media.MAX_DURATION_S) -> VideoInfo:
    """Describe a user's video, refusing what cannot or should not be processed with an InputError."""
    path = _check_file(path, "video")
    with media.open_input(path, "video") as container:
        return _describe(path, container, max_side, max_duration)


def _describe(path: Path, container, max_side: int, max_duration: float) -> VideoInfo:
    format_name = str(container.format.name)
    # Defence in depth: the demuxer whitelist has already refused others, but never trust one switch alone.
    if not set(format_name.split(",")) & set(media.ALLOWED_DEMUXERS):
        raise InputError(media.refused_format("video", path))
    video = next((s for s in container.streams.video if not _is_picture(s)), None)
    if video is None:
        raise InputError(f"{path.name!r} has no video stream (is it an audio file or an image?); upload a video")
    audio = next(iter(container.streams.audio), None)

    coded_w, coded_h = video.codec_context.width, video.codec_context.height
    if coded_w <= 0 or coded_h <= 0:
        raise InputError(f"video {path.name!r}: the video stream has no picture size (damaged file?)")
    rotation = _rotation(video)
    width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    if max(width, height) > max_side:
        raise InputError(
            f"video {path.name!r} is {width}x{height}; the limit is {max_side} pixels on either side. Downscale it, "
            f"or raise the limit with the environment variable {media.ENV_MAX_SIDE} or the max_side argument"
        )

    fps = float(video.average_rate or video.base_rate or 0)
    if fps <= 0:
        raise InputError(f"video {path.name!r}: the frame rate cannot be determined (damaged file?)")
    nb_frames = video.frames or None
    if nb_frames is None:
        # Matroska and others do not count frames; one packet read proves there is at least one.
        nb_frames = None if _packet_times(path, limit=1) else 0
    if nb_frames == 0:
        raise InputError(f"video {path.name!r} contains no video frames")
    duration = _seconds(video.duration, video.time_base) or (container.duration or 0) / 1e6
    if duration <= 0:
        duration = _scan_duration(path, fps)
    if duration <= 0:
        raise InputError(f"video {path.name!r} contains no video frames")
    if duration > max_duration:
        raise InputError(
            f"video {path.name!r} lasts {duration:.1f} s; the limit is {max_duration:g} s. Trim it, or raise the "
            f"limit with the environment variable {media.ENV_MAX_DURATION} or the max_duration argument"
        )
    frame_count = nb_frames if nb_frames is not None else max(1, round(duration * fps))

    start = _seconds(video.start_time, video.time_base)
    if start is None:
        start = (container.start_time or 0) / 1e6
    return VideoInfo(
        width=width, height=height, rotation=rotation, fps=fps, frame_count=frame_count, duration=duration,
        has_audio=audio is not None,
        audio_sample_rate=(audio.codec_context.sample_rate or None) if audio else None,
        audio_channels=(audio.codec_context.channels or None) if audio else None,
        format_name=format_name, start_time=start,
    )


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
                info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 (H, W, 3) frames ``start`` … ``start+count-1`` of the video resampled to constant ``fps``.

    ``fps=None`` keeps the source's average rate. Rotation metadata is applied. One ffmpeg process decodes and
    is killed when the iterator is closed or dropped early; reading past the end just stops. A video that stops
    decoding well before the length its container states (a truncated file) is read as far as it goes, with a
    warning saying how many frames of how many were read.
    """
    if start < 0 or (count is not None and count < 0):
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    path = _check_file(path, "video")
    info = info or probe(path)
    rate = _rate(fps if fps is not None else info.fps)
    if count == 0:
        return iter(())
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


def expected_frames(info: VideoInfo, fps: float | None = None) -> int:
    """How many frames ``read_frames`` should give at ``fps`` (default: the source's rate), from the container."""
    rate = _rate(fps if fps is not None else info.fps)
    if abs(float(rate) - info.fps) < 1e-6:
        return info.frame_count
    return max(1, round(info.duration * rate))


def _stream(cmd: list[str], path: Path, width: int, height: int, *, start: int, count: int | None,
            expected: int) -> Iterator[np.ndarray]:
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        log.debug("decoding %s: %s", path.name, cmd)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                                env=media.ffmpeg_env())
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
            if returncode < 0:  # killed by a signal: ffmpeg crashed, which is not the file's fault
                raise RuntimeError(f"ffmpeg crashed (signal {-returncode}) decoding {path.name!r}")
            if returncode != 0:
                raise InputError(f"video {path.name!r} could not be decoded ({_last_line(stderr, f'exit status {returncode}')})")
            if produced == 0 and start == 0:
                raise InputError(f"video {path.name!r} contains no decodable video frames")
            if count is None or produced < count:  # the decoder reached the end of what it could read
                _warn_if_cut_short(path, start + produced, expected)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


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


def count_frames(path: str | os.PathLike, fps: float | None = None, *, info: VideoInfo | None = None) -> int:
    """Exact number of frames ``read_frames(path, fps)`` yields (decodes the whole video, converts nothing)."""
    path = _check_file(path, "video")
    info = info or probe(path)
    rate = _rate(fps if fps is not None else info.fps)
    cmd = media.ffmpeg_command("-nostats", *_decode_args(path, info, rate, 0), "-f", "null", "-progress", "pipe:1",
                               "-")
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False,
                          env=media.ffmpeg_env())
    if proc.returncode < 0:
        raise RuntimeError(f"ffmpeg crashed (signal {-proc.returncode}) decoding {path.name!r}")
    if proc.returncode != 0:
        raise InputError(f"video {path.name!r} could not be decoded ({_last_line(proc.stderr, 'ffmpeg failed')})")
    frames = [line for line in proc.stdout.decode().splitlines() if line.startswith("frame=")]
    return int(frames[-1].split("=", 1)[1]) if frames else 0


# Containers that hold H.264 video with AAC audio and that every common player opens. WebM takes only
# VP8/VP9/AV1 with Vorbis/Opus; AVI has no clean way to store B-frame timestamps (its frame rate came out doubled).
OUTPUT_CONTAINERS = (".mp4", ".mov", ".mkv")


def check_output_container(path: str | os.PathLike) -> None:
    """Refuse (InputError) an output name whose extension is not a container we write: .mp4, .mov or .mkv."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_CONTAINERS:
        named = f"the {suffix} container" if suffix else "a name without an extension"
        raise InputError(f"output {Path(path).name!r}: {named} cannot hold the H.264 video and AAC audio we write; "
                         f"name the output with {', '.join(OUTPUT_CONTAINERS[:-1])} or {OUTPUT_CONTAINERS[-1]}")


def _container_args(path: Path) -> list[str]:
    # The index up front lets players start before the whole file has arrived; only MP4/MOV have the option.
    return ["-movflags", "+faststart"] if path.suffix.lower() in (".mp4", ".mov") else []


def _where(folder: Path) -> str:
    """How a user knows the folder: our temporary folder (TMPDIR decides where) or the output's."""
    try:
        Path(folder).resolve().relative_to(Path(tempfile.gettempdir()).resolve())
        return media.TEMP_FOLDER
    except ValueError:
        return media.OUTPUT_FOLDER


# Below this many free bytes a failed write is taken for a full disk even if ffmpeg's words were lost (its
# stderr goes to a temporary file, itself on a disk that may be the full one).
_LOW_SPACE = 1 << 20


def _disk_full(stderr: bytes, folder: Path) -> bool:
    return media.is_disk_full(stderr) or media.free_bytes(folder) < _LOW_SPACE


def _temp_beside(path: Path) -> Path:
    """An unused hidden name in ``path``'s folder (same file system, so the final rename is atomic).

    ffmpeg creates the file itself, so it gets the usual permissions rather than mkstemp's 0600.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if media.is_disk_full_error(exc):
            raise media.disk_full_error(path, _where(path.parent)) from None
        raise
    return path.with_name(f".{path.stem}.{secrets.token_hex(6)}.part{path.suffix or '.mp4'}")


def _video_span(path: Path) -> tuple[float, float]:
    """Seconds from the first to the end of the last video packet of a file we wrote, and the longest packet's
    duration; (0, 0) if it cannot be read."""
    try:
        times = [(pts, length or 0.0) for pts, length in _packet_times(path) if pts is not None]
    except InputError:
        return 0.0, 0.0
    if not times:
        return 0.0, 0.0
    end = max(pts + length for pts, length in times) - min(pts for pts, _ in times)
    return end, max(length for _, length in times)


class VideoWriter:
    """Stream RGB uint8 frames into an H.264 (4:2:0) file of ``width`` × ``height``; use as a context manager.

    H.264 4:2:0, what every player opens, needs even sizes: an odd width or height is padded by one pixel on the
    right or bottom, repeating the edge, so every original pixel is kept (``encoded_size`` is the size written).
    The file appears at ``path`` only when ``close()`` succeeds and holds every frame written; a full disk is a
    ResourceError naming the folder. ``abort()`` kills ffmpeg and leaves nothing.
    """

    def __init__(self, path: str | os.PathLike, fps: float, width: int, height: int, *, crf: int = 18,
                 preset: str = "medium", expected_frames: int | None = None):
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        self.path = Path(path)
        check_output_container(self.path)
        self.width, self.height = int(width), int(height)
        self.frames_written = 0
        self.fps = float(fps)
        self.expected_frames = expected_frames
        rate = _rate(fps)
        self._pad = (self.height % 2, self.width % 2)
        self.encoded_size = (self.width + self._pad[1], self.height + self._pad[0])
        if any(self._pad):
            log.warning("odd frame size %dx%d: writing %dx%d (the last column/row repeated) because H.264 4:2:0, "
                        "which every player opens, needs even sizes", self.width, self.height, *self.encoded_size)
        self._tmp = _temp_beside(self.path)
        enc_w, enc_h = self.encoded_size
        cmd = media.ffmpeg_command(
            "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{enc_w}x{enc_h}",
            "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0",
            # BT.709 matrix and tags: what players assume for HD, and what decoders honour when tagged.
            "-vf", "scale=out_color_matrix=bt709:out_range=tv",
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
            *_container_args(self.path), _url(self._tmp),
        )
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors,
                                      env=media.ffmpeg_env())
        self._done = False

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 (height, width, 3) frame."""
        if self._done:
            raise RuntimeError("write() on a closed VideoWriter")
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame of shape {(self.height, self.width, 3)}, "
                             f"got {frame.dtype} {frame.shape}")
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except BrokenPipeError:
            self._proc.wait()
            raise self._failure("ffmpeg stopped while encoding") from None
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
        if self.frames_written == 0:
            self.abort()
            raise RuntimeError(f"encoding {self.path.name!r} failed (no frames were written)")
        if returncode != 0:
            raise self._failure("encoding failed")
        # Check what was written, not only the exit status: an ffmpeg may report success on a full disk.
        wanted = self.frames_written / self.fps
        if _video_span(self._tmp)[0] < wanted - 0.5 / self.fps:
            raise self._failure(f"the file holds less than the {self.frames_written} frames written")
        self._done = True
        self._errors.close()
        os.replace(self._tmp, self.path)
        return self.path

    def _failure(self, what: str) -> Exception:
        """The error for a failed encode (a ResourceError for a full disk); removes the partial file."""
        self._errors.seek(0)
        stderr = self._errors.read()
        folder = self.path.parent
        full = _disk_full(stderr, folder)
        self.abort()
        if full:
            frames = max(self.expected_frames or 0, self.frames_written + 1)
            needed = media.estimate_video_bytes(*self.encoded_size, frames, self.fps, with_audio=False)
            return media.disk_full_error(self.path, f"{_where(folder)}; writing {self.path.name}", needed)
        detail = _last_line(stderr, f"exit status {self._proc.returncode}")
        return RuntimeError(f"{what}: {self.path.name!r} ({detail})")

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
    written beside ``out_path`` under a temporary name and renamed into place; the container follows the
    extension (``check_output_container``). Errors name their cause: the audio (InputError), a full disk
    (ResourceError), anything else is ours (RuntimeError).
    """
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    if not (math.isfinite(audio_start) and audio_start >= 0):
        raise ValueError(f"audio_start must be >= 0 seconds, got {audio_start!r}")
    video_path, out_path = Path(video_path), Path(out_path)
    check_output_container(out_path)
    audio_path = _check_file(audio_path, "audio")
    with media.open_input(audio_path, "audio") as container:
        sound = next(iter(container.streams.audio), None)
        if sound is None:
            raise InputError(f"audio {audio_path.name!r} has no audio stream")
        channels = sound.codec_context.channels or 2
    tmp = _temp_beside(out_path)
    seek = ["-ss", f"{audio_start:.6f}"] if audio_start > 0 else []
    cmd = media.ffmpeg_command(
        "-y", *media.safe_input_args(), "-i", _url(video_path),
        *seek, *media.safe_input_args(), "-i", _url(audio_path),
        "-map", "0:V:0", "-map", "1:a:0", "-c:v", "copy",
        # No -ar/-ac: the encoder keeps the source's rate and channel count (a rate AAC lacks, e.g. 37.8 kHz,
        # becomes the nearest one it has).
        "-af", "apad", "-c:a", "aac", "-b:a", f"{min(64 * max(channels, 2), 512)}k",
        "-t", f"{duration:.6f}", *_container_args(out_path), _url(tmp),
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False,
                          env=media.ffmpeg_env())
        # Check what was written, not only the exit status: an ffmpeg may report success on a full disk.
        video_end, frame = _video_span(video_path)
        wanted = min(duration, video_end)
        written = _video_span(tmp)[0] if proc.returncode == 0 else 0.0
        # The cut at ``duration`` falls on a packet boundary: up to a frame either way.
        if proc.returncode != 0 or written < wanted - max(0.05, 1.5 * frame):
            raise _mux_failure(proc, video_path, audio_path, out_path, written, wanted)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _mux_failure(proc: subprocess.CompletedProcess, video_path: Path, audio_path: Path, out_path: Path,
                 written: float, wanted: float) -> Exception:
    """Name the real cause of a failed mux: a full disk, the user's audio, an unwritable folder, or our bug."""
    stderr = proc.stderr.decode(errors="replace")
    detail = _last_line(stderr, f"exit status {proc.returncode}")
    if _disk_full(proc.stderr, out_path.parent):
        needed = os.path.getsize(video_path) + media.estimate_audio_bytes(wanted)
        return media.disk_full_error(out_path, f"{media.OUTPUT_FOLDER}; writing {out_path.name}", needed)
    audio_url = _url(audio_path)
    # ffmpeg names the input it failed on (its URL, or "Error while decoding stream #1:0" / "[aist#1:0…]").
    if audio_url in stderr or re.search(r"#1:\d", stderr):
        return InputError(f"audio {audio_path.name!r} could not be read ({detail.replace(audio_url + ': ', '')})")
    if "Permission denied" in stderr or "Read-only file system" in stderr:
        return InputError(f"output {out_path.name!r} cannot be written in {out_path.parent} ({detail}); "
                          f"choose a writable folder")
    if proc.returncode == 0:
        detail = f"the file holds {written:.2f} s of the {wanted:.2f} s written"
    return RuntimeError(f"muxing audio into {out_path.name!r} failed ({detail})")
