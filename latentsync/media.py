"""ffmpeg plumbing shared by ``audio`` and ``video``: where the binaries are, and how user files are opened safely.

User files come from strangers. A playlist (HLS, concat, …) disguised as a video would make ffmpeg read other
local files into our output, so every ffmpeg/ffprobe call that reads user input puts ``safe_input_args()``
before its ``-i``: plain-file protocol only, and only demuxers of ordinary media containers.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from latentsync.errors import InputError

# Demuxers of ordinary single-file media. Deliberately absent: hls, concat, image2 (file patterns), the
# subtitle/text formats, and every network or device input. ffmpeg matches a demuxer whose name is a list
# ("mov,mp4,m4a,3gp,3g2,mj2") when any of its names is listed here.
ALLOWED_DEMUXERS = (
    "mov", "mp4", "m4a", "3gp", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "ogg", "wav", "w64",
    "mp3", "aac", "flac", "asf", "aiff", "caf", "amr", "ac3", "eac3", "wv", "ape", "mxf", "dv", "h264",
    "hevc", "m4v", "gif", "nut", "rm", "truehd", "dts", "opus",
)


# Default caps on what a user may send; callers take them as arguments, deployments through the environment.
MAX_SIDE_PX = int(os.environ.get("LATENTSYNC_MAX_SIDE", "4096"))
MAX_DURATION_S = float(os.environ.get("LATENTSYNC_MAX_DURATION", "600"))


@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``$LATENTSYNC_FFMPEG``, the system's, else the static one in imageio-ffmpeg."""
    explicit = os.environ.get("LATENTSYNC_FFMPEG")
    if explicit:
        return explicit
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.cache
def ffprobe_exe() -> str | None:
    """ffprobe beside the ffmpeg in use, or on PATH; None when there is none (imageio-ffmpeg ships no ffprobe)."""
    sibling = Path(ffmpeg_exe()).with_name("ffprobe")
    if sibling.is_file():
        return str(sibling)
    return shutil.which("ffprobe")


def safe_input_args() -> list[str]:
    """Input options that confine ffmpeg to one plain local file of an ordinary media format."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join(ALLOWED_DEMUXERS)]


def run_ffmpeg(args: list[str], *, what: str, input_error: bool = True) -> subprocess.CompletedProcess:
    """Run ffmpeg with an argument list; a failure on user input becomes an InputError carrying ffmpeg's words."""
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = message[-1] if message else f"exit status {proc.returncode}"
        if input_error:
            raise InputError(f"{what}: ffmpeg could not read it ({detail})")
        raise RuntimeError(f"{what}: ffmpeg failed ({detail})")
    return proc
