"""ffmpeg plumbing shared by ``audio`` and ``video``: the one pinned ffmpeg, safe opening of user files, disk space.

One FFmpeg release everywhere, whatever the machine has on PATH: imageio-ffmpeg's static binary decodes, resamples
and encodes, and PyAV (pinned to a wheel built on the same FFmpeg release) probes, since that binary ships no
ffprobe. A system ffmpeg would change results (resampling alone moves the log-mel by 3e-2 between 5.1 and 7.0).

User files come from strangers. A playlist (HLS, concat, …) disguised as a video would make ffmpeg read other
local files into our output, so every ffmpeg call and every PyAV open of user input is confined by
``safe_input_args()`` / ``SAFE_OPEN_OPTIONS``: plain-file protocol only, and only demuxers of ordinary media.
"""
from __future__ import annotations

import errno
import functools
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latentsync.errors import InputError, ResourceError

if TYPE_CHECKING:
    from av.container import InputContainer


# Demuxers of ordinary single-file media. Deliberately absent: hls, concat, image2 (file patterns), the
# subtitle/text formats, and every network or device input. ffmpeg matches a demuxer whose name is a list
# ("mov,mp4,m4a,3gp,3g2,mj2") when any of its names is listed here.
ALLOWED_DEMUXERS = (
    "mov", "mp4", "m4a", "3gp", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "ogg", "wav", "w64",
    "mp3", "aac", "flac", "asf", "aiff", "caf", "amr", "ac3", "eac3", "wv", "ape", "mxf", "dv", "h264",
    "hevc", "m4v", "gif", "nut", "rm", "truehd", "dts", "opus",
)
SAFE_OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(ALLOWED_DEMUXERS)}

# Default caps on what a user may send. Library functions take them as arguments; entry points read the
# deployment's overrides with ``caps_from_env``.
MAX_SIDE_PX = 4096
MAX_DURATION_S = 600.0
ENV_MAX_SIDE = "LATENTSYNC_MAX_SIDE"
ENV_MAX_DURATION = "LATENTSYNC_MAX_DURATION"

# How a disk-full message names the folder: a user knows it as the temporary folder (TMPDIR) or the output's.
TEMP_FOLDER = "the temporary folder; TMPDIR chooses where it is"
OUTPUT_FOLDER = "the output folder"
# What ffmpeg and the OS say when a disk or quota is full.
_DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded")
# Rough size of our H.264 (CRF 18) output: bits per pixel per frame for camera footage, with room to spare,
# plus the AAC bit rate ``video.mux_audio`` uses and a small fixed margin for headers and file system blocks (the
# index grows with the frames and is inside the bits-per-pixel allowance), so a tiny job needs little room.
_H264_BITS_PER_PIXEL = 0.15
_AAC_BITS_PER_S = 128_000
_SPACE_MARGIN_BYTES = 1 << 20


@dataclass(frozen=True)
class MediaCaps:
    """Caps on a user's media: the longer picture side in pixels and the duration in seconds."""

    max_side: int = MAX_SIDE_PX
    max_duration: float = MAX_DURATION_S


def caps_from_env(environ: Mapping[str, str]) -> MediaCaps:
    """The caps a deployment sets with LATENTSYNC_MAX_SIDE / LATENTSYNC_MAX_DURATION (defaults where unset)."""
    caps = MediaCaps()
    side, duration = environ.get(ENV_MAX_SIDE, "").strip(), environ.get(ENV_MAX_DURATION, "").strip()
    if side:
        if not side.isdigit() or int(side) <= 0:
            raise InputError(f"{ENV_MAX_SIDE} must be a positive whole number of pixels, got {side!r}")
        caps = MediaCaps(int(side), caps.max_duration)
    if duration:
        try:
            seconds = float(duration)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"{ENV_MAX_DURATION} must be a positive number of seconds, got {duration!r}")
        caps = MediaCaps(caps.max_side, seconds)
    return caps


@functools.cache
def ffmpeg_exe() -> str:
    """imageio-ffmpeg's static ffmpeg (or the binary its IMAGEIO_FFMPEG_EXE names); never one found on PATH."""
    import imageio_ffmpeg

    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        exe = "ffmpeg"
    # imageio-ffmpeg falls back to a bare "ffmpeg" from PATH when its wheel has no binary for this platform.
    if os.path.dirname(exe) == "":
        raise ResourceError("imageio-ffmpeg has no bundled ffmpeg for this platform; reinstall it from a "
                            "platform wheel (pip install --force-reinstall imageio-ffmpeg)")
    return exe


def ffmpeg_env() -> dict[str, str]:
    """The environment to run the pinned ffmpeg in: this process's, with character-set conversion switched off.

    The static binary's glibc loads iconv modules at run time and crashes doing so (MPEG-TS service names, hence
    every .ts file, HLS, concat). With GCONV_PATH naming no module folder, iconv fails cleanly and FFmpeg keeps
    such strings unconverted; we read no text from media, so no result changes.
    """
    return {**os.environ, "GCONV_PATH": os.devnull}


def safe_input_args() -> list[str]:
    """Input options that confine ffmpeg to one plain local file of an ordinary media format."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(ALLOWED_DEMUXERS)]


def file_url(path: str | os.PathLike) -> str:
    """``file:`` URL of a path: names such as "-x.mp4", "http:foo.mp4" or "a|b" stay plain names."""
    return "file:" + os.path.abspath(os.fspath(path))


def ffmpeg_command(*args: str, loglevel: str = "error") -> list[str]:
    """The pinned ffmpeg with our fixed prefix (no stdin, no banner) and ``args``."""
    return [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", loglevel, *args]


def open_input(path: Path, what: str) -> InputContainer:
    """Open a user's file with PyAV for probing, under the same confinement as ffmpeg; InputError when unusable."""
    import av
    import av.logging

    url = file_url(path)
    previous = av.logging.get_level(), av.logging.get_skip_repeated()
    # FFmpeg's own words are the only way to tell a refused format, and the same refusal twice must be seen twice.
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)
    try:
        with av.logging.Capture() as logs:
            # container_options, not options: PyAV 13 copies ``options`` into one dict per stream counted at open
            # time and crashes when the demuxer adds streams later (FLV, MPEG-TS). Tags in a stray encoding must
            # not make a readable video unreadable.
            return av.open(url, container_options=dict(SAFE_OPEN_OPTIONS), metadata_errors="replace")
    except av.FFmpegError as exc:
        messages = [message.strip() for _, _, message in logs if message.strip()]
        # A playlist: a demuxer off the whitelist, or (FFmpeg 7) HLS behind another extension, left undetected.
        if any("not on whitelist" in m or "Not detecting m3u8/hls" in m for m in messages):
            raise InputError(refused_format(what, path)) from None
        detail = messages[-1] if messages else (exc.strerror or str(exc))
        raise InputError(f"{what} {path.name!r} is not a readable media file ({detail})") from None
    finally:
        av.logging.set_level(previous[0])
        av.logging.set_skip_repeated(previous[1])


def refused_format(what: str, path: Path) -> str:
    """The message for a playlist, image or other format we do not open."""
    return (f"{what} {path.name!r} is not in an accepted format: playlists (HLS, concat lists), images and image "
            f"sequences are refused; upload a single ordinary media file such as MP4, MOV, MKV or WebM")


def last_line(stderr: bytes | str, fallback: str) -> str:
    """The last non-empty line of ffmpeg's stderr (its most specific complaint), or ``fallback``."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else fallback


# ----------------------------------------------------------------------------------------------- disk space
def is_disk_full(stderr: bytes | str) -> bool:
    """Whether ffmpeg's stderr says a write failed for lack of space (or quota)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return any(marker in text for marker in _DISK_FULL_MARKERS)


def is_disk_full_error(exc: BaseException) -> bool:
    """Whether a Python exception is the OS refusing a write for lack of space (or quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to us on the file system that holds ``path`` (or would, for a path not created yet)."""
    folder = Path(os.path.abspath(os.fspath(path)))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def disk_full_error(path: str | os.PathLike, what: str, needed: int | None = None) -> ResourceError:
    """The error for a full disk: which location, how much it has, and roughly how much the run needs."""
    location = os.path.dirname(os.path.abspath(os.fspath(path)))
    need = f"about {_size(needed)} needed, " if needed else ""
    return ResourceError(f"no space left on the disk holding {location} ({what}): {need}{_size(free_bytes(location))} "
                         f"free; free some space or choose another location")


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (in bytes) the file system holding ``folder`` (or its nearest existing parent) takes."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return os.pathconf(path, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # Linux, macOS and Windows file systems


def estimate_video_bytes(width: int, height: int, frames: int, fps: float, *, with_audio: bool = True) -> int:
    """A rough upper estimate of the size of our output (H.264 CRF 18, plus AAC audio when ``with_audio``)."""
    video_bytes = int(_H264_BITS_PER_PIXEL * width * height * frames / 8) + _SPACE_MARGIN_BYTES
    return video_bytes + (estimate_audio_bytes(frames / fps) if with_audio and fps > 0 else 0)


def estimate_audio_bytes(seconds: float) -> int:
    """A rough upper estimate of the AAC audio ``video.mux_audio`` adds for ``seconds`` of output."""
    return int(_AAC_BITS_PER_S * seconds / 8) + _SPACE_MARGIN_BYTES


def check_free_space(temp_dir: str | os.PathLike, output: str | os.PathLike, needed: int) -> None:
    """Raise ResourceError unless the temporary folder and the output's folder each have ``needed`` bytes free.

    A run writes the silent video (≈ ``needed``) into ``temp_dir``, then the final file beside ``output`` while
    the silent one still exists, so one disk holding both needs twice as much.
    """
    temp_dir, out_dir = Path(os.path.abspath(temp_dir)), Path(os.path.abspath(output)).parent
    both_on_one = _device(temp_dir) == _device(out_dir)
    out_need = 2 * needed if both_on_one else needed
    for folder, what, need in ((temp_dir, TEMP_FOLDER, needed), (out_dir, OUTPUT_FOLDER, out_need)):
        if free_bytes(folder) < need:
            raise disk_full_error(folder / "x", what, need)


def _device(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev
