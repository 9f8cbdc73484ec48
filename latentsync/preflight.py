"""Checks on a run's files that take milliseconds, made before any model loads or frame is decoded.

The inputs must be existing files; the output must be a file name LatentSync may write: not a folder, not one of
the inputs, not an existing file unless the caller allows replacing it (we never overwrite a user's file unasked), in
a folder that exists or can be created and is writable, with an extension whose container holds H.264 video and AAC
audio. Each problem is one ``InputError`` line. The video is probed once, within the deployment's caps, and the run
goes on with what the probe found (``Inputs.info``); the audio must hold an audio stream within the duration cap. Then
the temporary folder (``TMPDIR``) and the output's folder must have room for a rough upper estimate of what the
run writes (``ResourceError`` naming the full one).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latentsync import media
from latentsync import video as video_mod
from latentsync.errors import InputError
from latentsync.options import OUTPUT_FPS, RunOptions, check_file


@dataclass(frozen=True)
class Sources:
    """A run's two input files once checked, what the video holds and how long the audio's container says it is."""

    video: Path
    audio: Path
    info: video_mod.VideoInfo
    audio_seconds: float  # 0 when the container does not say


@dataclass(frozen=True)
class Inputs(Sources):
    """A run's files once checked: the two inputs, what they hold, and the output to write."""

    output: Path


def check_sources(video: str | os.PathLike, audio: str | os.PathLike, caps: media.MediaCaps) -> Sources:
    """The two input files checked once and the video probed once within ``caps``; an ``InputError`` naming the
    first problem."""
    return _probed(check_file("video", video), check_file("audio", audio), caps)


def check_inputs(video: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike,
                 caps: media.MediaCaps, *, overwrite: bool = False) -> Inputs:
    """Every file of a run checked once and the video probed once within ``caps``; an ``InputError`` naming the first
    problem (an existing output too, unless ``overwrite``), a ``ResourceError`` for a disk without room. Creates and
    writes nothing."""
    video_path = check_file("video", video)
    audio_path = check_file("audio", audio)
    output_path = check_output(output, inputs=(video_path, audio_path))
    if not overwrite and os.path.lexists(output_path):  # a dangling link too: the rename would replace it
        raise InputError(f"output {output_path} already exists; LatentSync never replaces a file unasked: choose "
                         "another name, or allow it (--overwrite, or overwrite=True in Python)")
    sources = _probed(video_path, audio_path, caps)
    check_free_space(sources, output_path)
    return Inputs(video=sources.video, audio=sources.audio, info=sources.info, audio_seconds=sources.audio_seconds,
                  output=output_path)


def _probed(video: Path, audio: Path, caps: media.MediaCaps) -> Sources:
    info = video_mod.probe(video, max_side=caps.max_side, max_duration=caps.max_duration)
    return Sources(video=video, audio=audio, info=info, audio_seconds=_audio_seconds(audio, caps.max_duration))


def check_options(sources: Sources, options: RunOptions) -> None:
    """What the options ask of these inputs, for a door that loads the models after its checks: each time range holds
    a frame at the run's rate, and not all of them begin after the longest the output can be (``loop_mode``'s rule
    on the two durations, as the containers state them; the plan checks against the exact length)."""
    fps = sources.info.fps if options.keep_fps else OUTPUT_FPS
    video_s, audio_s = sources.info.duration, sources.audio_seconds or math.inf  # unknown: no bound from it
    longest = {"cut_off": min(video_s, audio_s), "silence": max(video_s, audio_s)}.get(options.loop_mode, audio_s)
    from latentsync.timeline import check_ranges  # torch (Whisper's constants): not for the CLI's file checks

    check_ranges(options.ranges, fps, None if math.isinf(longest) else longest)


def check_free_space(sources: Sources, output: Path) -> None:
    """``ResourceError`` unless ``TMPDIR`` and the output's folder have room for a rough upper estimate of the run's
    files: the output as long as the longer input, at the higher of the source's rate and ours."""
    info = sources.info
    seconds = max(info.duration, sources.audio_seconds)
    fps = max(info.fps, OUTPUT_FPS)
    needed = media.estimate_video_bytes(info.width, info.height, math.ceil(seconds * fps), fps)
    media.check_free_space(tempfile.gettempdir(), output, needed)


# Encoder padding (AAC priming, mp3 frames) may lengthen a file cut exactly at the cap by a few ms (audio.py's slack).
_AUDIO_SLACK_S = 0.1


def _audio_seconds(path: Path, max_duration: float) -> float:
    """Seconds of the audio file as its container states them (0 when it does not); an ``InputError`` for a file
    without an audio stream or longer than ``max_duration``."""
    import av  # PyAV, which the batch command's checks of its jobs (check_output) do without

    with media.open_input(path, "audio") as container:
        has_sound = bool(container.streams.audio)
        duration = container.duration
    if not has_sound:
        raise InputError(f"audio {path.name!r} has no audio track; upload an audio file or a video with sound")
    seconds = duration / av.time_base if duration else 0.0
    if seconds > max_duration + _AUDIO_SLACK_S:
        raise InputError(
            f"audio {path.name!r} lasts {seconds:.1f} s; the limit is {max_duration:g} s. Trim it, or raise the "
            f"limit with the environment variable {media.ENV_MAX_DURATION} or the max_duration argument"
        )
    return seconds


def check_output(output: str | os.PathLike, inputs: tuple[Path, ...] = ()) -> Path:
    """``output`` as a Path once it is known to name a file we may write, and none of ``inputs``."""
    text = os.fspath(output)
    if not str(text).strip():
        raise InputError("the output path is empty; name the video file to write, e.g. out.mp4")
    # Only the string still shows a trailing slash: Path("dir/") is Path("dir").
    if isinstance(text, str) and text.endswith(("/", os.sep)):
        raise InputError(f"output {text} names a folder (it ends with a slash); name the file to write, "
                         f"e.g. {text}out.mp4")
    path = Path(text)
    limit = media.name_max(path.parent)
    size = len(os.fsencode(path.name))  # the bytes the OS gave (argv's undecodable bytes are surrogate escapes)
    if size > limit:
        raise InputError(f"output name {path.name[:40]}… is {size} bytes long; this file system "
                         f"takes at most {limit}: choose a shorter name")
    if path.is_dir():
        raise InputError(f"output {path} is an existing folder; name the file to write, e.g. {path / 'out.mp4'}")
    video_mod.check_output_container(path)
    for given in inputs:
        if path.exists() and os.path.samefile(path, given):  # the same file under another name, a link, ...
            raise InputError(f"output {path} is the input file {given}; LatentSync never overwrites its inputs: "
                             "choose another output name")
    check_folder(path.parent)
    return path


def check_folder(folder: Path) -> None:
    """The output's folder exists and is writable, or the nearest existing folder above it is (we create the rest)."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create the output folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable for this user"
        if existing == folder:
            raise InputError(f"cannot write into the output folder {folder}: it {why}; choose another output folder")
        raise InputError(f"cannot create the output folder {folder}: {existing} {why}; choose another output folder")
