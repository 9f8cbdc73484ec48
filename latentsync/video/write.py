"""Writing video: ``VideoWriter`` streams RGB frames into H.264, ``mux_audio`` puts the user's audio beside it.

What we write is checked after writing (frames present, disk not full) before it is moved into place under its
final name; a full disk is a ResourceError naming the folder, and a failed write leaves nothing behind.
"""
from __future__ import annotations

import logging
import math
import os
import re
import secrets
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from latentsync import media
from latentsync.errors import InputError
from latentsync.options import check_file
from latentsync.video.probe import exact_rate, packet_times

log = logging.getLogger(__name__)

_url = media.file_url
_last_line = media.last_line


# Containers that hold H.264 video with AAC audio and that every common player opens. WebM takes only
# VP8/VP9/AV1 with Vorbis/Opus; AVI has no clean way to store B-frame timestamps (its frame rate came out doubled).
# .m4v is MP4 under Apple's name (ffmpeg writes it with its MP4 family's ipod muxer).
OUTPUT_CONTAINERS = (".mp4", ".mov", ".mkv", ".m4v")


def check_output_container(path: str | os.PathLike) -> None:
    """Refuse (InputError) an output name whose extension is not a container we write: .mp4, .mov, .mkv or .m4v."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_CONTAINERS:
        named = f"the {suffix} container" if suffix else "a name without an extension"
        raise InputError(f"output {Path(path).name!r}: {named} cannot hold the H.264 video and AAC audio we write; "
                         f"name the output with {', '.join(OUTPUT_CONTAINERS[:-1])} or {OUTPUT_CONTAINERS[-1]}")


def _container_args(path: Path) -> list[str]:
    # The index up front lets players start before the whole file has arrived; only the MP4 family has the option.
    return ["-movflags", "+faststart"] if path.suffix.lower() in (".mp4", ".mov", ".m4v") else []


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
    suffix = f".{secrets.token_hex(6)}.part{path.suffix or '.mp4'}"
    # The hidden name must fit the folder's name limit too: a legal output name may be as long as that limit.
    room = media.name_max(path.parent) - len(os.fsencode(f".{suffix}"))
    # In the OS's bytes: a name from argv may hold undecodable bytes as surrogate escapes.
    stem = os.fsdecode(os.fsencode(path.stem)[:max(room, 1)]) or "x"
    return path.with_name(f".{stem}{suffix}")


def _video_span(path: Path) -> tuple[float, float]:
    """Seconds from the first to the end of the last video packet of a file we wrote, and the longest packet's
    duration; (0, 0) if it cannot be read."""
    try:
        times = [(pts, length or 0.0) for pts, length in packet_times(path) if pts is not None]
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
        rate = exact_rate(fps)
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
        assert self._proc.stdin is not None  # ffmpeg is started with stdin=PIPE
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data.cast("B"))  # .data: the array's memoryview
        except BrokenPipeError:
            self._proc.wait()
            raise self._failure("ffmpeg stopped while encoding") from None
        self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        if self._done:
            return self.path
        assert self._proc.stdin is not None  # ffmpeg is started with stdin=PIPE
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
    audio_path = check_file("audio", audio_path)
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
