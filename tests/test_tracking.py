"""Pass 1 (face tracking) in one process and in detection worker processes: same matrices, nothing left behind."""
from __future__ import annotations

import math

import cv2
import numpy as np
import psutil
import pytest

from cancel_utils import CancelAfter
from latentsync import InputError
from latentsync import video as video_mod
from latentsync.control import StageClock
from latentsync.errors import Cancelled
from latentsync.facepool import FacePool
from latentsync.tracking import PERSIST_FRAMES, FaceTrack
from media_utils import face_clip, write_clip


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


def drifting_1080p(image: np.ndarray, n: int) -> list[np.ndarray]:
    """``image`` stretched to a little over 1920×1080 and a 1080p window drifting over it, ``n`` frames."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    big = cv2.resize(image, (1960, 1104), interpolation=cv2.INTER_CUBIC)
    return [np.ascontiguousarray(big[int(12 + 5 * np.cos(t / 4)):][:1080, int(20 + 8 * np.sin(t / 3)):][:, :1920])
            for t in range(n)]


def small_astronaut_1080p(width: int, n: int) -> list[np.ndarray]:
    """The astronaut, its face ``width`` px wide (the mesh's extent), in a grey 1080p frame, drifting."""
    from skimage.data import astronaut

    side = round(width / 0.184)  # the astronaut's face is 0.184 of the image's height
    face = cv2.resize(astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(n):
        m = np.float32([[1, 0, 600 + 3 * np.sin(t / 5) * side / 100], [0, 1, 300 + 2 * np.cos(t / 7) * side / 100]])
        frames.append(cv2.warpAffine(face, m, (1920, 1080), dst=np.full((1080, 1920, 3), 100, np.uint8),
                                     borderMode=cv2.BORDER_TRANSPARENT))
    return frames


def test_a_face_seen_in_fewer_frames_than_the_persistence_is_no_face(tmp_path):
    shown = range(6, 6 + PERSIST_FRAMES - 1)
    clip = face_clip(tmp_path / "glimpse.mp4", 16, hide=[i for i in range(16) if i not in shown])
    _, has_face = _track(clip)
    assert len(has_face) == 16 and not has_face.any()
    _, has_face = _track(face_clip(tmp_path / "run.mp4", 16, hide=range(6 + PERSIST_FRAMES, 16)))
    assert has_face.tolist() == [True] * (6 + PERSIST_FRAMES) + [False] * (10 - PERSIST_FRAMES)


def test_a_clip_shorter_than_the_persistence_keeps_its_face(tmp_path):
    _, has_face = _track(face_clip(tmp_path / "short.mp4", PERSIST_FRAMES - 2))
    assert has_face.all()


def test_a_run_reaching_the_limit_is_decided_by_the_frames_after_it(tmp_path):
    clip = face_clip(tmp_path / "late.mp4", 24, hide=range(0, 17))
    _, has_face = _track(clip, limit=19)  # the face shows in frames 17-18 of the 19 and goes on after
    assert has_face.tolist() == [False] * 17 + [True] * 2


def test_a_1080p_clip_of_the_rocket_has_no_face(tmp_path):
    clip = write_clip(tmp_path / "rocket.mp4", drifting_1080p(skimage_data().rocket(), 8))
    info = video_mod.probe(clip)
    with pytest.raises(InputError, match="no face was found"):
        FaceTrack.open(clip, 25.0, info, None, None, 64, clock=StageClock()).finish()


def test_a_40_px_face_in_1080p_is_tracked_in_every_frame(tmp_path):
    _, has_face = _track(write_clip(tmp_path / "small.mp4", small_astronaut_1080p(40, 6)))
    assert has_face.all()


def skimage_data():
    return pytest.importorskip("skimage.data")
