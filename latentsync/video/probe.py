"""Probing a user's video before any work: what it holds (``VideoInfo``), and whether it may be processed.

``probe`` refuses, with an InputError, what cannot or should not be processed: a file that is missing, empty, not
an accepted container, without a video stream or frames, larger or longer than the caps. PyAV opens the file
through ``media``, which confines it to the accepted demuxers and reads it by its ``file:`` URL.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from latentsync import media
from latentsync.errors import InputError
from latentsync.options import check_file


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


# Still-image codecs: a video stream of one of these without a frame rate is a cover picture (an MP3's or
# M4A's album art), not a video. (PyAV 13 does not expose FFmpeg's attached_pic disposition.)
_PICTURE_CODECS = ("mjpeg", "png", "bmp", "webp", "tiff", "gif", "jpegls")


def exact_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction (29.97… → 30000/1001), the form ffmpeg options take without drift."""
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(float(fps))
    except (TypeError, ValueError, OverflowError):
        rate = None
    if rate is None or rate <= 0:
        raise ValueError(f"frame rate must be a positive number, got {fps!r}")
    return rate.limit_denominator(1_000_000)



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


def packet_times(path: Path, limit: int | None = None) -> list[tuple[float | None, float | None]]:
    """(pts, duration) in seconds of the first ``limit`` (all) packets of the video stream, without decoding."""
    import av

    times: list[tuple[float | None, float | None]] = []
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
    packets = packet_times(path)
    spans = [(pts, length or 1.0 / fps) for pts, length in packets if pts is not None]
    if not spans:  # raw streams carry no timestamps: one packet per frame
        return len(packets) / fps
    return max(pts + length for pts, length in spans) - min(pts for pts, _ in spans)


def probe(path: str | os.PathLike, *, max_side: int = media.MAX_SIDE_PX,
          max_duration: float = media.MAX_DURATION_S) -> VideoInfo:
    """Describe a user's video, refusing what cannot or should not be processed with an InputError."""
    path = check_file("video", path)
    # Returned after the block: PyAV's stubs type Container.__exit__ as -> bool (it returns None, swallowing nothing).
    with media.open_input(path, "video") as container:
        info = _describe(path, container, max_side, max_duration)
    return info


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
        nb_frames = None if packet_times(path, limit=1) else 0
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
