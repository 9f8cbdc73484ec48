"""The synthesis stages run concurrently: same frames as one after another, bounded queues, clean failures."""
from __future__ import annotations

import tempfile
import threading
import time

import numpy as np
import psutil
import pytest

from cancel_utils import CancelAfter
from latentsync import InputError
from latentsync.errors import Cancelled
from latentsync.pipeline import LipSync
from latentsync.stages import QUEUE_DEPTH, run_stages
from media_utils import face_clip, speech
from tiny_weights import make_tiny_weights

FAST = {"inference_steps": 2, "guidance_scale": 1.5}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder, cfg = make_tiny_weights(tmp_path_factory.mktemp("weights"))
    return LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu",
                                   face_workers=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"gap": face_clip(d / "gap.mp4", 40, hide=range(18, 35)), "speech": speech(d / "speech.wav", 2.0)}


def _frames(pipe, media, tmp_path, monkeypatch, serial: bool) -> dict[int, np.ndarray]:
    seen: dict[int, np.ndarray] = {}
    monkeypatch.setattr(pipe, "serial", serial)
    monkeypatch.setattr(pipe, "frame_tap", lambda j, frame: seen.setdefault(j, frame.copy()))
    pipe.lipsync(media["gap"], media["speech"], tmp_path / f"serial{serial}.mp4", seed=3, **FAST)
    return seen


def test_concurrent_stages_give_the_serial_frames(pipe, media, tmp_path, monkeypatch):
    serial = _frames(pipe, media, tmp_path, monkeypatch, serial=True)
    concurrent = _frames(pipe, media, tmp_path, monkeypatch, serial=False)
    assert sorted(serial) == sorted(concurrent) == list(range(52))  # bounce past the 40 source frames
    for j in serial:
        assert np.array_equal(serial[j], concurrent[j]), f"frame {j} differs"
    assert (tmp_path / "serialTrue.mp4").read_bytes() == (tmp_path / "serialFalse.mp4").read_bytes()


def test_queues_keep_the_first_stage_at_most_a_few_items_ahead():
    produced, consumed, ahead = [0], [0], []
    gate = threading.Semaphore(0)

    def first(i):
        produced[0] += 1
        ahead.append(produced[0] - consumed[0])
        gate.release()
        return i

    def last(i):
        gate.acquire()  # the last stage is slow: it waits until the first has run past this item
        consumed[0] += 1

    run_stages(range(40), [first, lambda i: i, last], concurrent=True)
    assert consumed[0] == 40
    assert max(ahead) <= 2 * (QUEUE_DEPTH + 1) + 1  # two queues and the items in hand: not the whole video


def _leftovers() -> tuple[list[str], list[str]]:
    threads = [t.name for t in threading.enumerate() if t.name.startswith("latentsync-stage")]
    ffmpeg = [p.name() for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]
    return threads, ffmpeg


def _fail_at_chunk(cls_path: str, monkeypatch, exc: BaseException, chunk: int = 1):
    module, name = cls_path.rsplit(".", 1)
    import importlib

    cls = getattr(importlib.import_module(module), name)
    original = cls.__call__

    def failing(self, item):
        index = getattr(item, "index", None)
        if index is None:
            index = item.chunk.index
        if index == chunk:
            raise exc
        return original(self, item)

    monkeypatch.setattr(cls, "__call__", failing)


@pytest.mark.parametrize("stage", ["latentsync.stages.align.AlignStage",
                                   "latentsync.stages.generate.GenerateStage",
                                   "latentsync.stages.paste.PasteStage"])
def test_an_error_in_any_stage_stops_the_run_and_leaves_nothing(pipe, media, tmp_path, monkeypatch, stage):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    message = f"video 'gap.mp4' could not be decoded (failure injected into {stage})"
    _fail_at_chunk(stage, monkeypatch, InputError(message))
    out = tmp_path / "out.mp4"
    with pytest.raises(InputError) as caught:
        pipe.lipsync(media["gap"], media["speech"], out, seed=1, **FAST)
    assert str(caught.value) == message  # the stage's own error, unchanged
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []
    assert list(tmp_path.glob(".*part*")) == []  # no partial encoder output
    assert _leftovers() == ([], [])


def test_an_encoder_failure_stops_the_run(pipe, media, tmp_path, monkeypatch):
    from latentsync import video as video_mod

    def broken_write(self, frame):
        self._proc.kill()  # ffmpeg dies under the writer
        self._proc.wait()
        raise RuntimeError("ffmpeg stopped while encoding 'video.mp4' (killed)")

    monkeypatch.setattr(video_mod.VideoWriter, "write", broken_write)
    with pytest.raises(RuntimeError, match="ffmpeg stopped"):
        pipe.lipsync(media["gap"], media["speech"], tmp_path / "out.mp4", seed=1, **FAST)
    assert not (tmp_path / "out.mp4").exists() and _leftovers() == ([], [])


def test_a_face_pass_failure_is_raised_before_any_frame(pipe, media, tmp_path, monkeypatch):
    import latentsync.tracking as tracking

    def no_frames(*args, **kwargs):
        raise InputError("video 'gap.mp4' could not be decoded (injected)")

    monkeypatch.setattr(tracking.FaceLandmarker, "detect", no_frames)
    with pytest.raises(InputError, match="injected"):
        pipe.lipsync(media["gap"], media["speech"], tmp_path / "out.mp4", seed=1, **FAST)
    assert _leftovers() == ([], [])



def test_cancel_between_chunks_stops_every_stage(pipe, media, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pipe, "frame_tap", lambda j, frame: seen.append(j))
    plan = pipe.plan(media["gap"], media["speech"], pipe_options(seed=1))
    with pytest.raises(Cancelled):
        # Cancel is checked before each chunk and after every denoising step: set it during chunk 1's steps.
        pipe.render(plan, tmp_path / "part.mp4", cancel=CancelAfter(1 + 2 + 1 + 1))
    assert max(seen, default=-1) < 2 * plan.chunk_size  # stopped within one chunk of the cancel
    assert not (tmp_path / "part.mp4").exists() and _leftovers() == ([], [])


def pipe_options(**kw):
    from latentsync.options import RunOptions

    return RunOptions(**FAST, **kw)


def test_stages_overlap_on_a_720p_clip(pipe, tmp_path):
    """The CPU overlap figure: busy seconds of all stages add up to ≥ 1.3× the wall time (serial: 1.0×)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from pipeline_bench import make_clip

    clip = make_clip(tmp_path / "720p.mp4", 3.0, 1280, 720)
    # The default loop mode, where the face pass runs beside synthesis too.
    result = pipe.lipsync(clip, speech(tmp_path / "s.wav", 3.0), tmp_path / "out.mp4", seed=0, **FAST)
    seconds = dict(result.seconds)
    wall = seconds.pop("wall")
    assert sum(seconds.values()) >= 1.3 * wall, result.seconds


def test_detection_workers_plan_the_same_run(pipe, media, monkeypatch):
    one = pipe.plan(media["gap"], media["speech"], pipe_options(seed=2))
    monkeypatch.setattr(pipe, "face_workers", 2)
    try:
        two = pipe.plan(media["gap"], media["speech"], pipe_options(seed=2))
        assert pipe._detectors.pool is not None and pipe._detectors.pool.alive
    finally:
        pipe.close()
    assert np.array_equal(one.has_face, two.has_face) and one.num_out == two.num_out
    assert np.array_equal(one.matrices[one.has_face], two.matrices[two.has_face])
    assert _leftovers() == ([], [])


def test_generation_and_whisper_run_on_one_long_lived_gpu_thread(pipe, media, tmp_path, monkeypatch):
    from latentsync.stages.generate import GenerateStage

    seen = []
    call, encode = GenerateStage.__call__, pipe.models.audio_encoder.features_from_log_mel

    def watched(fn, what):
        def run(*args):
            seen.append((what, threading.get_ident(), threading.current_thread().name))
            return fn(*args)
        return run

    monkeypatch.setattr(GenerateStage, "__call__", watched(call, "generate"))
    monkeypatch.setattr(pipe.models.audio_encoder, "features_from_log_mel", watched(encode, "whisper"))
    for serial in (False, True):  # two runs, concurrent then serial: the same thread every time
        monkeypatch.setattr(pipe, "serial", serial)
        pipe.lipsync(media["gap"], media["speech"], tmp_path / f"out{serial}.mp4", seed=1, **FAST)
    assert {what for what, *_ in seen} == {"generate", "whisper"}
    assert len({ident for _, ident, _ in seen}) == 1 and seen[0][2].startswith("latentsync-gpu")
    pipe.close()  # stops the thread; a later run starts another
    assert not any(t.ident == seen[0][1] for t in threading.enumerate())


def test_a_cancel_raised_into_the_caller_waits_for_every_stage_to_stop():
    """Cog cancels by raising in the predict thread, often while it waits for the stages. ``run_stages`` must not
    return before every stage thread has left what it was doing: the caller then closes what they read from (a
    Thread.join that such an exception interrupts can mark a running thread stopped)."""
    import ctypes

    inside = threading.Event()

    def items():
        for i in range(100):
            inside.set()
            time.sleep(0.2)  # making an item: the caller's cleanup must wait for this to end
            inside.clear()
            yield i

    class Stop(BaseException):
        pass

    outcome = []

    def caller():
        try:
            run_stages(items(), [lambda x: x, lambda x: x], concurrent=True)
        except Stop:
            outcome.append(inside.is_set())

    t = threading.Thread(target=caller)
    t.start()
    time.sleep(0.5)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(Stop))
    t.join()
    assert outcome == [False], "run_stages returned while a stage was still making an item"
    assert not [th for th in threading.enumerate() if th.name.startswith("latentsync-stage-")]
