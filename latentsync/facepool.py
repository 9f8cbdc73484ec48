"""Face detection in worker processes over frame ranges, so pass 1 keeps up with the GPU on a many-core machine.

mediapipe detects one frame at a time on one core. Each worker decodes its own range of frames (a seeked read
gives the same frames as a read from the start) and returns the faces of every frame; the caller takes the
ranges in order. Detection depends on each frame alone, so the faces equal a single process's.

Workers are plain ``python -c`` subprocesses speaking length-prefixed pickles over their stdin/stdout, not
``multiprocessing``: its spawned children re-import the caller's main module (the CLI's ``__main__`` would run
again in each), and a worker that dies leaves a ``multiprocessing.Pool`` waiting forever, where here the closed
pipe is an error. Imports stay light (no torch): a worker imports only this module, ``face`` and ``video``.
"""
from __future__ import annotations

import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from latentsync import video as video_mod
from latentsync.face import Face, FaceLandmarker, make_detector

_HEADER = struct.Struct("<Q")  # byte length of the pickle that follows
_POLL_S = 0.1  # how often a wait for a worker looks at the caller's cancel check


def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    (n,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return pickle.loads(_read_exactly(fd, n))


def _detect_range(landmarker: FaceLandmarker, video: Path, fps: float, info: video_mod.VideoInfo, start: int,
                  count: int) -> list[list[Face]]:
    frames = video_mod.read_frames(video, fps, start=start, count=count, info=info)
    try:
        return [landmarker.detect(frame) for frame in frames]
    finally:
        frames.close()


def serve() -> None:
    """A worker's main loop: requests ``(video, fps, info, start, count)`` in, ``("ok", faces)`` or
    ``("error", exception)`` out, until its stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the replies
    landmarker = make_detector()
    # terminate() sends SIGTERM: unwind normally, so a read's ffmpeg child is killed by its generator's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    requests = sys.stdin.buffer.fileno()
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        reply: tuple[str, list[list[Face]] | Exception]
        try:
            reply = ("ok", _detect_range(landmarker, *request))
        except Exception as exc:  # noqa: BLE001 — the parent raises it
            reply = ("error", exc)
        _send(replies, reply)


class FacePool:
    """``workers`` processes detecting faces; ``terminate()`` (also on any error) leaves none behind."""

    def __init__(self, workers: int):
        self.workers = int(workers)
        # The worker imports this very copy of the package, whatever the caller's sys.path was.
        root = str(Path(__file__).resolve().parent.parent)
        code = f"import sys; sys.path.insert(0, {root!r}); from latentsync.facepool import serve; serve()"
        self._procs: list[subprocess.Popen[bytes]] | None = [
            subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            for _ in range(self.workers)]

    @property
    def alive(self) -> bool:
        return self._procs is not None

    def detect(self, video: Path, fps: float, info: video_mod.VideoInfo, limit: int | None,
               check: Callable[[], None] = lambda: None, start: int = 0) -> Iterator[list[Face]]:
        """The faces of frames ``start`` … ``limit``−1 (to the end when None), in order; ``check()`` runs while
        waiting.

        At most two ranges per worker are in flight, so memory does not grow with the video's length.
        """
        if self._procs is None:
            raise RuntimeError("the face pool was terminated")
        total = (limit if limit is not None else math.ceil(info.duration * fps) + 1) - start
        block = min(max(math.ceil(total / (4 * self.workers)), 16), 128)
        pending: deque[tuple[subprocess.Popen[bytes], int]] = deque()
        nxt, k = start, 0
        try:
            while True:
                while len(pending) < 2 * self.workers and (limit is None or nxt < limit):
                    count = block if limit is None else min(block, limit - nxt)
                    proc = self._procs[k % self.workers]  # round robin: each worker answers in the order asked
                    _send(proc.stdin, (video, fps, info, nxt, count))
                    pending.append((proc, count))
                    nxt, k = nxt + count, k + 1
                if not pending:
                    return
                proc, count = pending.popleft()
                faces = self._reply(proc, check)
                yield from faces
                if len(faces) < count:  # the video ended inside this range; later ranges are empty
                    while pending:  # read the answers still owed, so later requests get their own answers
                        self._reply(*pending.popleft()[:1], lambda: None)
                    return
        finally:
            if pending:  # stopped early (error, cancel, the caller closed us): the pipes hold stale answers
                self.terminate()

    def _reply(self, proc: subprocess.Popen[bytes], check: Callable[[], None]) -> list[list[Face]]:
        assert proc.stdout is not None  # every worker is started with stdout=PIPE
        fd = proc.stdout.fileno()
        while not select.select([fd], [], [], _POLL_S)[0]:
            check()
        try:
            status, value = _receive(fd)
        except EOFError:
            raise RuntimeError(f"a face-detection worker stopped unexpectedly (exit status {proc.poll()})") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Let the workers finish and exit."""
        if self._procs is not None:
            for proc in self._procs:
                assert proc.stdin is not None  # every worker is started with stdin=PIPE
                proc.stdin.close()
            for proc in self._procs:
                proc.wait()
                assert proc.stdout is not None  # and with stdout=PIPE
                proc.stdout.close()
            self._procs = None

    def terminate(self) -> None:
        """Stop the workers now (error, cancel); their ffmpeg readers stop with them."""
        if self._procs is not None:
            for proc in self._procs:
                proc.terminate()
            for proc in self._procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    assert pipe is not None  # every worker is started with stdin=PIPE and stdout=PIPE
                    try:
                        pipe.close()
                    except OSError:  # a request still in the closed pipe
                        pass
            self._procs = None


class Detectors:
    """The face detectors kept between runs: worker processes, or one in-process landmarker (building
    mediapipe's graphs takes a moment)."""

    def __init__(self) -> None:
        self.pool: FacePool | None = None
        self.landmarker: FaceLandmarker | None = None

    def get(self, workers: int) -> tuple[FacePool | None, FaceLandmarker | None]:
        """``workers`` detection processes (0: the in-process detector), made at the first run and kept; the
        workers are made again after an error or a cancel terminated them."""
        if workers > 0 and (self.pool is None or not self.pool.alive):
            self.pool = FacePool(workers)
        if workers == 0 and self.landmarker is None:
            self.landmarker = make_detector()
        return self.pool, self.landmarker

    def close(self) -> None:
        """Stop the workers and free the detector."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.landmarker is not None:
            self.landmarker.close()
            self.landmarker = None


def default_workers() -> int:
    """Detection workers worth starting here: none on small machines, where the other stages need the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 4 else min(cores - 4, 8)
