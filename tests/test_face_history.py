"""How far back pass 1 must look: the tracker's re-pick after a lost face, the proof that a pass started late ends
in the state of a pass from frame 0 (``forgets_history``), and the late start of a ranged run's face pass."""
from __future__ import annotations

import math

import numpy as np
import pytest

from latentsync import video as video_mod
from latentsync.align import BIAS_BOUND, FaceAligner, SmoothingBounds
from latentsync.control import StageClock
from latentsync.face import Face, FaceTracker
from latentsync.facepool import FacePool
from latentsync.options import RunOptions
from latentsync.pipeline import LipSync
from latentsync.timeline import FADE_FRAMES
from latentsync.tracking import CONTEXT_FRAMES, PERSIST_FRAMES, FaceTrack, forgotten_from, make_tracker
from media_utils import face_clip, read_stamp, speech
from tiny_weights import make_tiny_weights

FPS, RES = 25.0, 64
REPICK = make_tracker(None, None, FPS).repick_after


def face(x: float, y: float, size: float, jitter: np.ndarray | None = None) -> Face:
    """A synthetic face of width ``size`` centred at (x, y), anchors where a real face has them (± ``jitter``)."""
    anchors = np.array([[x - 0.25 * size, y - 0.2 * size], [x + 0.25 * size, y - 0.2 * size], [x, y + 0.1 * size]])
    if jitter is not None:
        anchors = anchors + jitter
    box = (x - size / 2, y - 0.6 * size, x + size / 2, y + 0.6 * size)
    return Face(box=box, score=1.0, anchors=anchors, landmarks=np.zeros((0, 2)))


class _Fed:
    def __init__(self, faces):
        self.faces = iter(faces)

    def detect(self, _frame):
        return next(self.faces)


def track(faces: list[list[Face]]) -> tuple[list[np.ndarray | None], list[Face | None]]:
    """Pass 1's tracker and smoothing over these frames' faces, as ``FaceTrack`` runs them: matrices and faces."""
    tracker, aligner = make_tracker(_Fed(faces), None, FPS), FaceAligner(RES)
    matrices, picked = [], []
    for _ in faces:
        f = tracker.track(None)
        if f is None:
            aligner.reset()
        picked.append(f)
        matrices.append(None if f is None else aligner.matrix(f.anchors))
    return matrices, picked


def same(a: list[np.ndarray | None], b: list[np.ndarray | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
        for x, y in zip(a, b, strict=True))


# --- the tracker ------------------------------------------------------------------------------------------------------

def test_a_face_lost_for_a_second_is_picked_afresh_after_a_cut():
    """A cut moves the face three face sizes and doubles it: followed no more, it is picked again after a second;
    without ``repick_after`` (the class's default) it stays lost, and a short loss never switches faces."""
    before, after = [face(100, 100, 40)], [face(300, 150, 90)]
    faces = [before] * 10 + [after] * 40
    _, picked = track(faces)
    assert all(p is not None for p in picked[:10]) and all(p is None for p in picked[10:10 + REPICK])
    assert all(p is not None and p.box == after[0].box for p in picked[10 + REPICK:])
    old = FaceTracker(_Fed(faces))
    assert [old.track(None) is None for _ in faces][10:] == [True] * 40
    # The followed face hidden for less than a second while another shows: the other is never taken.
    other = face(300, 100, 30)  # smaller, and farther than a tracked face may move
    short = [[before[0], other]] * 5 + [[other]] * (REPICK - 1) + [[before[0], other]] * 5
    _, picked = track(short)
    assert all(p is None for p in picked[5:5 + REPICK - 1])
    assert all(p.box == before[0].box for p in picked[:5] + picked[-5:])


# --- the proof --------------------------------------------------------------------------------------------------------

def test_smoothing_from_any_start_gives_the_bounds_matrix_where_they_agree():
    rng = np.random.default_rng(0)
    walk = [face(100 + t, 100, 50, rng.normal(0, 2, (3, 2))).anchors for t in range(60)]
    bounds = SmoothingBounds(RES)
    agree = [bounds.agree(a) for a in walk]
    assert not any(agree[:5]) and all(agree[30:])
    bounds = SmoothingBounds(RES)
    assert [bounds.agree(a) for a in walk[:3] + [None] + walk[3:5]] == [False] * 3 + [True] * 3  # a gap resets all
    # Every start within the bounds gives the bounds' matrix where they agree; where they do not, starts differ.
    starts = [-BIAS_BOUND, -1.0, 0.0, 0.3, BIAS_BOUND - 0.01, None]
    runs = []
    for start in starts:
        aligner = FaceAligner(RES)
        aligner._p_bias = None if start is None else np.full(2, start)
        runs.append([aligner.matrix(a) for a in walk])
    for t, ok in enumerate(agree):
        assert not ok or len({r[t].tobytes() for r in runs}) == 1, f"frame {t}"
    assert len({r[0].tobytes() for r in runs}) == len(starts)


def _person(rng, x, y, size):
    """A face drifting around (x, y), one frame at a time."""
    while True:
        x, y = x + rng.normal(0, 1.5), y + rng.normal(0, 1)
        yield face(x, y, size, rng.normal(0, 1.5, (3, 2)))


def _history(rng, n):
    """Frames that may lock the tracker anywhere: two people, cuts, gaps."""
    a, b = _person(rng, 80, 120, 60), _person(rng, 400, 200, rng.uniform(40, 160))
    kind = rng.integers(4)
    out = []
    for t in range(n):
        r = rng.random()
        if kind == 0:
            out.append([next(b)])  # only the far person: a pass from 0 follows them
        elif kind == 1:
            out.append([next(a), next(b)] if r < 0.8 else [])
        elif kind == 2:
            out.append([next(b)] if t < n // 2 else [])
        else:
            out.append([next(a)] if r < 0.5 else [next(b)] if r < 0.8 else [])
    return out


def _context(rng, n):
    """The frames before the edit: mostly the one person, maybe a second one or gaps at times."""
    a, b = _person(rng, 80, 120, 60), _person(rng, 250, 100, 70)
    crowded, gappy = rng.random() < 0.3, rng.random() < 0.3
    out = []
    for _ in range(n):
        r = rng.random()
        out.append([] if gappy and r < 0.1 else [next(a), next(b)] if crowded and r < 0.2 else [next(a)])
    return out


def test_a_late_start_is_trusted_only_where_it_provably_gives_a_pass_from_frame_0s_matrices():
    """Random histories before a context: from the frame ``forgotten_from`` names, wherever the smoothing bounds
    agree, the late pass's matrices are those of a pass from frame 0; and the history does change them elsewhere."""
    rng = np.random.default_rng(1)
    trusted = checked = differed_untrusted = 0
    for _ in range(300):
        n_ctx = int(rng.choice([20, 40, CONTEXT_FRAMES]))
        history, context = _history(rng, int(rng.integers(1, 80))), _context(rng, n_ctx)
        after = _context(rng, 16)
        whole, _ = track(history + context + after)
        late, picked = track(context + after)
        sync = forgotten_from(context, None, FPS, RES)
        if sync is None:
            differed_untrusted += not same(whole[-16:], late[-16:])
            continue
        trusted += 1
        bounds = SmoothingBounds(RES)
        for k in range(sync, len(late)):
            agree = bounds.agree(None if picked[k] is None else picked[k].anchors)
            if k >= n_ctx:
                assert agree, "the bounds agreed at the end of the context, and stay so with the same face"
                assert same([whole[len(history) + k]], [late[k]]), "a trusted late start gave other matrices"
                checked += 1
    assert trusted > 60 and checked == 16 * trusted and differed_untrusted > 40, (trusted, differed_untrusted)


def test_one_face_in_view_for_a_second_is_enough_and_two_faces_are_not():
    rng = np.random.default_rng(2)
    a, b = _person(rng, 80, 120, 60), _person(rng, 250, 100, 70)
    single = [[next(a)] for _ in range(CONTEXT_FRAMES)]
    assert forgotten_from(single, None, FPS, RES) == REPICK  # a window of a second and a frame
    assert forgotten_from(single[:REPICK], None, FPS, RES) is None
    assert forgotten_from(single[:REPICK + 3], None, FPS, RES) is None  # the smoothing's bounds still apart
    assert forgotten_from([[next(a), next(b)] for _ in range(CONTEXT_FRAMES)], None, FPS, RES) is None


# --- the ranged face pass ---------------------------------------------------------------------------------------------

class _Stamped:
    """A landmarker that reads each frame's stamp and answers with synthetic faces: a second person before
    ``crowd_until``; it counts the frames it is asked about."""

    def __init__(self, crowd_until: int):
        self.crowd_until, self.asked = crowd_until, []

    def detect(self, frame):
        i = read_stamp(frame)
        self.asked.append(i)
        main = face(100 + 5 * math.sin(i / 7), 100 + 3 * math.cos(i / 5), 60)
        return [main, face(250, 100, 70)] if i < self.crowd_until else [main]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return face_clip(tmp_path_factory.mktemp("history") / "clip200.mp4", 200)


def _face_pass(clip, landmarker, **kw):
    info = video_mod.probe(clip)
    with FaceTrack.open(clip, FPS, info, None, None, RES, clock=StageClock(), landmarker=landmarker, **kw) as t:
        t.ensure(math.inf)
    return t.start, *t.arrays()


@pytest.mark.parametrize("crowd_until, start", [(0, 112 - CONTEXT_FRAMES), (100, 0)])
def test_the_face_pass_starts_as_late_as_is_provably_safe(clip, crowd_until, start):
    """One face before the edit: the pass starts ``CONTEXT_FRAMES`` early and reads no frame before; a second face
    up to frame 100: the context doubles back to frame 0. Either way the edited frames' matrices are a whole
    pass's, bit for bit."""
    whole_start, whole, has_whole = _face_pass(clip, _Stamped(crowd_until))
    landmarker = _Stamped(crowd_until)
    got_start, late, has_late = _face_pass(clip, landmarker, first=112, horizon=144)
    assert whole_start == 0 and got_start == start and len(late) == len(whole) == 200
    ahead = 144 + PERSIST_FRAMES + FADE_FRAMES  # the horizon and the frames that decide its last faces
    assert min(landmarker.asked) == start and len(landmarker.asked) == ahead - start
    assert np.array_equal(late[112:144], whole[112:144]) and has_late[112:144].all()
    assert not has_late[:start].any() and np.isnan(late[:start]).all()


def test_a_ranged_run_late_in_the_video_detects_near_the_range_only_and_keeps_the_whole_runs_frames(clip,
                                                                                                tmp_path):
    """Real faces, a real run: range 5-5.4 s of an 8 s clip edits chunks 7 and 8 (frames 112 … 143). The face
    pass reads from frame 16, and those chunks' frames equal the whole run's bit for bit."""
    folder, cfg = make_tiny_weights(tmp_path / "weights")
    pipe = LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu",
                                   face_workers=0)
    wav = speech(tmp_path / "speech.wav", 8.0)
    opts = {"inference_steps": 2, "seed": 3}
    frames: dict[str, dict[int, np.ndarray]] = {"whole": {}, "ranged": {}}
    try:
        ranged = pipe.plan(clip, wav, RunOptions(ranges="5-5.4", **opts))
        whole = pipe.plan(clip, wav, RunOptions(**opts))
        for name, plan in [("ranged", ranged), ("whole", whole)]:
            pipe.frame_tap = lambda j, f, seen=frames[name]: seen.setdefault(j, f.copy())
            pipe.render(plan, tmp_path / f"{name}.mp4", range(7, 9))
    finally:
        pipe.frame_tap = None
        pipe.close()
    assert ranged.face_start == 16 and whole.face_start == 0
    assert np.array_equal(ranged.matrices[112:144], whole.matrices[112:144])
    for j in range(125, 135):  # inside the range: the whole run's frames
        assert np.array_equal(frames["ranged"][j], frames["whole"][j]), f"frame {j}"


def test_a_tie_in_the_smoothing_replays_the_pass_from_frame_0(clip, monkeypatch):
    """Were the smoothing's bounds ever to give an edited frame two matrices, the pass detects the frames it
    skipped and replays from frame 0: the edited frames still get a whole pass's matrices."""
    _, whole, _ = _face_pass(clip, _Stamped(0))
    landmarker = _Stamped(0)
    info = video_mod.probe(clip)
    with FaceTrack.open(clip, FPS, info, None, None, RES, clock=StageClock(), landmarker=landmarker, first=112,
                   horizon=144) as t:
        monkeypatch.setattr(SmoothingBounds, "agree", lambda self, anchors: False)  # once the start is chosen
        t.ensure(math.inf)
    late, has_late = t.arrays()
    ahead = 144 + PERSIST_FRAMES + FADE_FRAMES  # the horizon and the frames that decide its last faces
    assert t.start == 16 and sorted(landmarker.asked) == list(range(ahead))  # every frame up to there, once
    assert np.array_equal(late[112:144], whole[112:144]) and has_late[112:144].all()


def test_a_late_start_and_its_replay_on_worker_processes(clip, monkeypatch):
    """Real faces, detected by a worker: the late start's edited matrices equal a whole in-process pass's, also
    after a replay (its skipped frames detected here while the worker reads ahead)."""
    _, whole, _ = _face_pass(clip, None)
    pool = FacePool(1)
    try:
        _, late, _ = _face_pass(clip, None, pool=pool, first=112, horizon=144)
        with FaceTrack.open(clip, FPS, video_mod.probe(clip), None, None, RES, clock=StageClock(), pool=pool, first=112,
                       horizon=144) as t:
            monkeypatch.setattr(SmoothingBounds, "agree", lambda self, anchors: False)
            t.ensure(math.inf)
    finally:
        pool.close()
    replayed, _ = t.arrays()
    assert t.start == 16
    assert np.array_equal(late[112:144], whole[112:144]) and np.array_equal(replayed[112:144], whole[112:144])


def test_a_cancel_while_the_late_start_is_chosen_stops_the_workers(clip):
    from latentsync.errors import Cancelled

    class Soon:
        def __init__(self):
            self.asked = 0

        def is_set(self):
            self.asked += 1
            return self.asked > 1

    pool = FacePool(1)
    with pytest.raises(Cancelled):
        FaceTrack.open(clip, FPS, video_mod.probe(clip), None, None, RES, clock=StageClock(), pool=pool, first=112,
                  horizon=144, cancel=Soon())
    assert not pool.alive  # terminated: no worker or ffmpeg left behind
