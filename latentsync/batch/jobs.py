"""The jobs file and the results file: :class:`Job`, :func:`read_jobs`, :func:`check_results`, :func:`result_line`,
:class:`Results`.

Each line of JOBS is ``{"video": …, "audio": …, "output": …}`` plus any run option (``RunOptions`` names) and
``"segments"``. Outputs appear only by rename from a per-job work folder beside them, and a re-run skips an output
only when it is a finished mp4 (``video.check.is_complete``: its boxes span the whole file and it probes with video
and audio), so a file left by a killed worker never counts as done. No Ray here.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentsync.errors import InputError, ResourceError
from latentsync.options import RunOptions, check_file
from latentsync.preflight import check_folder, check_output

JOB_FIELDS = ("video", "audio", "output")
WORK_SUFFIX = ".latentsync-work"  # the per-job folder beside an output: temporary outputs and segment parts


@dataclass(frozen=True)
class Job:
    """One line of the jobs file, checked: absolute paths, validated options and the number of segments."""

    line: int
    video: Path
    audio: Path
    output: Path
    options: RunOptions
    segments: int = 1

    @property
    def work_dir(self) -> Path:
        """Beside the output (same file system, so the final rename is atomic); removed when the job ends."""
        return self.output.with_name(f".{self.output.name}{WORK_SUFFIX}")

    def remove_work_dir(self) -> None:
        """Remove the job's work folder (ours by name): temporary outputs and parts of a failed or killed attempt."""
        if self.work_dir.is_dir():
            shutil.rmtree(self.work_dir, ignore_errors=True)


def read_jobs(path: Path, segments: int = 1, results: Path | None = None) -> tuple[list[Job], list[dict[str, Any]]]:
    """Parse and check a jobs file before anything runs: the good jobs, and a failed result line for each bad one
    (the others still run). A line fails on the CLI's own checks of its paths, and when its output is a file the
    batch reads (any job's input, the jobs file) or writes (another job's output, ``results``)."""
    check_file("jobs file", path)
    parsed: list[Job] = []
    failed: list[dict[str, Any]] = []
    for number, raw in enumerate(_lines(path), start=1):
        if isinstance(raw, UnicodeDecodeError):
            failed.append(result_line(number, None, None, "failed", f"line {number} is not UTF-8 text (byte "
                                      f"0x{raw.object[raw.start]:02x} at column {raw.start + 1}); save the jobs "
                                      "file as UTF-8"))
            continue
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            failed.append(result_line(number, None, None, "failed", f"line {number} is not JSON ({e.msg})"))
            continue
        if not isinstance(entry, dict):
            failed.append(result_line(number, None, None, "failed", f"line {number} is not a JSON object"))
            continue
        try:
            parsed.append(_job(number, entry, segments))
        except InputError as e:
            failed.append(result_line(number, entry.get("video"), entry.get("output"), "failed", str(e)))
    if not parsed and not failed:
        raise InputError(f"jobs file {path} has no jobs")
    # Files the batch reads, by identity: an output that is one of them would be overwritten while in use.
    read = {_identity(path): "the jobs file"}
    for job in parsed:
        read.setdefault(_identity(job.video), f"the video of line {job.line}")
        read.setdefault(_identity(job.audio), f"the audio of line {job.line}")
    if results is not None and _identity(results) in read:
        raise InputError(f"--results {results} is {read[_identity(results)]}; choose another results file")
    written = {} if results is None else {_identity(results): "the results file (--results)"}
    jobs = []
    for job in parsed:
        key = _identity(job.output)
        clash = read.get(key) or written.get(key)
        if clash is None:
            written[key] = f"the output of line {job.line}"
            jobs.append(job)
            continue
        why = "never overwrites its inputs" if key in read else "writes each file once"
        failed.append(result_line(job.line, job.video, job.output, "failed",
                                  f"output {job.output} is also {clash}; LatentSync {why}: choose another output name"))
    return jobs, sorted(failed, key=lambda r: r["line"])


def _lines(path: Path) -> list[str | UnicodeDecodeError]:
    """The jobs file's lines as text, or the decoding error of a line that is not UTF-8 (it fails alone). A
    byte-order mark, as Windows editors write, is not part of line 1; lines end at LF, CR or CR LF only."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    lines: list[str | UnicodeDecodeError] = []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append(e)
    return lines


def check_results(text: str) -> Path:
    """The ``--results`` path once it names a file in a folder the command may write, else an ``InputError``
    (:func:`read_jobs` then refuses it as any job's input, and fails a job whose output it is)."""
    if not text.strip():
        raise InputError("--results is empty; name the file to write, e.g. results.jsonl")
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise InputError(f"--results {text} names a folder; name the file to write, e.g. "
                         f"{Path(text) / 'results.jsonl'}")
    path = Path(text).expanduser().absolute()
    check_folder(path.parent)
    return path


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: device and inode once it exists (links, hard links), else the path
    with links and ``..`` resolved."""
    path = path.expanduser().resolve()  # "missing/../x" is x, as it is once the missing folder is made
    try:
        st = path.stat()
    except OSError:
        return ("path", path)
    return ("file", st.st_dev, st.st_ino)


def _job(number: int, entry: dict[str, Any], segments: int) -> Job:
    missing = [name for name in JOB_FIELDS if not isinstance(entry.get(name), str) or not entry[name]]
    if missing:
        raise InputError(f"line {number} needs {', '.join(repr(m) for m in missing)} (a path)")
    options = {k: v for k, v in entry.items() if k not in JOB_FIELDS and k != "segments"}
    video, audio = (check_file(name, Path(entry[name]).expanduser()).resolve() for name in ("video", "audio"))
    # The CLI's checks and messages, on the path as written (a trailing slash is gone once it is a Path).
    output = check_output(os.path.expanduser(entry["output"]), inputs=(video, audio)).resolve()
    count = entry.get("segments", segments)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"segments must be a whole number of at least 1, got {count!r}")
    # Same validation and messages as the CLI and the Python API.
    return Job(number, video, audio, output, RunOptions.make(options).with_seed(), count)


def result_line(line: int, video: Any, output: Any, status: str, error: str | None = None, **fields: Any) -> dict:
    """One RESULTS line: where, what happened, and (on success) seed, frames, wall seconds, sync score and the time
    ranges lip-synced (empty: the whole video)."""
    return {"line": line, "video": None if video is None else str(video),
            "output": None if output is None else str(output), "status": status, "error": error,
            "seed": fields.get("seed"), "frames": fields.get("frames"), "seconds": fields.get("seconds"),
            "sync": fields.get("sync"), "ranges": fields.get("ranges")}


class Results:
    """The results file, one complete JSON line per job: each line goes in one ``write`` and is synced, and a write
    the disk cut short is cut back, so the file never ends in half a line (a reader may follow it as jobs end). The
    file is created (or emptied) with its first line: a batch killed before any job ended leaves no empty one."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.size = 0

    def add(self, line: dict[str, Any]) -> None:
        """Append one result line, whole or not at all (a ``ResourceError`` then names the results file)."""
        data = (json.dumps(line) + "\n").encode()
        try:
            if self.fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self.fd)
        except OSError as e:
            if self.fd is not None:
                os.ftruncate(self.fd, self.size)
            raise ResourceError(f"cannot write the results file {self.path}: {e.strerror or e}") from None
        self.size += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

