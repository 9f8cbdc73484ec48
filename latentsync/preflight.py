"""Checks on a run's files that take milliseconds, made before any model loads or frame is decoded.

The inputs must be existing files; the output must be a file name LatentSync may write: not a folder, not one of
the inputs (we never overwrite a user's file), in a folder that exists or can be created and is writable, with an
extension whose container holds H.264 video and AAC audio. Each problem is one ``InputError`` line.
"""
from __future__ import annotations

import os
from pathlib import Path

from latentsync.errors import InputError
from latentsync.options import check_file

# Containers that take the H.264 + AAC streams the pipeline writes, as they are. To be replaced by
# video.check_output_container once the media module has it (see _check_container).
OUTPUT_SUFFIXES = (".mp4", ".mov", ".mkv")


def check_run_paths(video: str | os.PathLike, audio: str | os.PathLike,
                    output: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The run's three paths, checked; an ``InputError`` naming the first problem. Creates and writes nothing."""
    video_path = check_file("video", video)
    audio_path = check_file("audio", audio)
    return video_path, audio_path, check_output(output, inputs=(video_path, audio_path))


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
    if path.is_dir():
        raise InputError(f"output {path} is an existing folder; name the file to write, e.g. {path / 'out.mp4'}")
    _check_container(path)
    for given in inputs:
        if path.exists() and os.path.samefile(path, given):  # the same file under another name, a link, ...
            raise InputError(f"output {path} is the input file {given}; LatentSync never overwrites its inputs: "
                             "choose another output name")
    _check_folder(path.parent)
    return path


def _check_container(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        what = f"a {suffix} file" if suffix else "a file without an extension"
        raise InputError(f"output {path.name}: LatentSync writes H.264 video with AAC audio, which {what} cannot "
                         f"hold as such; name it {', '.join(OUTPUT_SUFFIXES[:-1])} or {OUTPUT_SUFFIXES[-1]}")


def _check_folder(folder: Path) -> None:
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
