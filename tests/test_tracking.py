"""Pass 1 (face tracking) in one process and in detection worker processes: same matrices, nothing left behind."""
from __future__ import annotations

import math

import numpy as np
import psutil
import pytest

from cancel_utils import CancelAfter
from latentsync import InputError
from latentsync import video as video_mod
from latentsync.control import StageClock
from latentsync.errors import Cancelled
from latentsync.facepool import FacePool
from latentsync.tracking import FaceTrack
from media_utils import face_clip


@pytest.fixture(scope="module")
def gap_clip(tmp_path_factory):
    return face_clip(tmp_path_factory.mktemp("tracking") / "gap.mp4", 70, hide=range(20, 37))


@pytest.fixture(scope="module")
def pool():
    p = FacePool(2)
    yield p
    p.close()


def track_faces(video, fps, info, limit, point, resolution, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The whole of pass 1 at once, unchecked: the arrays after tracking every frame."""
    with FaceTrack.open(video, fps, info, limit, point, resolution, **kw) as track:
        track.ensure(math.inf)
    return track.arrays()


def _track(clip, limit=None, **kw):
    info = video_mod.probe(clip)
    return track_faces(clip, 25.0, info, limit, None, 64, clock=StageClock(), **kw)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}


def test_worker_processes_give_the_single_process_matrices(gap_clip, pool):
    one, has_one = _track(gap_clip)
    par, has_par = _track(gap_clip, pool=pool)
    assert len(one) == 70 and has_one.sum() == 70 - 17
    assert np.array_equal(has_one, has_par)
    assert np.array_equal(one[has_one], par[has_par])  # bit for bit, smoothing restarts included
    limited, _ = _track(gap_clip, limit=33, pool=pool)
    assert np.array_equal(limited[:20], one[:20]) and len(limited) == 33



def test_cancel_and_errors_stop_the_workers(gap_clip, tmp_path):
    before = _children()  # other tests' pools, multiprocessing's resource tracker
    p = FacePool(2)
    with pytest.raises(Cancelled):
        _track(gap_clip, pool=p, cancel=CancelAfter(2))
    assert not p.alive and _children() <= before  # terminated: no worker, no ffmpeg left
    p = FacePool(2)
    gone = tmp_path / "gone.mp4"
    gone.write_bytes(gap_clip.read_bytes())
    info = video_mod.probe(gone)
    gone.unlink()  # the workers' reads fail
    with pytest.raises(InputError, match="does not exist"):
        track_faces(gone, 25.0, info, None, None, 64, clock=StageClock(), pool=p)
    assert not p.alive and _children() <= before
