"""predict.py called directly (no server): inputs, output folders, metrics, errors, setup on good and bad weights."""
from __future__ import annotations

import functools
import gc
import http.server
import inspect
import logging
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from latentsync import InputError
from media_utils import face_clip, probe_streams, tone, write_clip
from mounts import read_only_tmpfs
from tiny_weights import DESTS, manifest_for, tiny_weights_with_manifest

sys.path.insert(0, str(REPO))
import predict  # noqa: E402  (predict.py lives at the repository root, as Cog wants it)

FAST = {"inference_steps": 10, "guidance_scale": 1.0}


def call(predictor: predict.Predictor, **inputs):
    """``predict()`` as Cog calls it: every omitted input takes the default its ``Input(...)`` declares."""
    for name, param in inspect.signature(predictor.predict).parameters.items():
        if name not in inputs:
            default = param.default
            inputs[name] = getattr(default, "default", default)
    return predictor.predict(**inputs)


def runs(predictor: predict.Predictor) -> list[str]:
    """The prediction folders in the worker's folder (beside its scratch folder)."""
    return [p.name for p in predictor.work_root.iterdir() if p != predictor.scratch]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_weights_with_manifest(tmp_path_factory)


@pytest.fixture(scope="module")
def env(tiny):
    weights, unet_config, manifest = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTSYNC_WEIGHTS_DIR", str(weights))
        mp.setenv("LATENTSYNC_UNET_CONFIG", str(unet_config))
        mp.setenv("LATENTSYNC_SYNCNET_CONFIG", str(weights / "syncnet.yaml"))
        mp.setenv("LATENTSYNC_MANIFEST", str(manifest))
        mp.setenv("LATENTSYNC_VERSION", "1.6")
        yield mp


@pytest.fixture(scope="module")
def predictor(env):
    p = predict.Predictor()
    p.setup()
    yield p
    shutil.rmtree(p.work_root, ignore_errors=True)


@pytest.fixture
def metrics(predictor, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(predictor, "record_metric", lambda key, value, mode="replace": seen.__setitem__(key, value))
    return seen


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    gray = [np.full((240, 320, 3), 120, np.uint8) for _ in range(16)]
    return {"clip": face_clip(d / "clip.mp4", 16), "speech": tone(d / "speech.wav", 0.6),
            "noface": write_clip(d / "noface.mp4", gray), "dir": d}


def test_inputs_declare_the_documented_defaults_bounds_and_choices():
    from latentsync.options import FACE_SELECTS, LOOP_MODES

    params = inspect.signature(predict.Predictor.predict).parameters
    field = {name: p.default for name, p in params.items() if name != "self"}
    assert list(field) == ["video", "audio", "guidance_scale", "inference_steps", "sampler", "guidance_until", "seed",
                           "loop_mode", "enable_deepcache", "keep_fps", "face_select", "ranges"]
    assert (field["guidance_scale"].default, field["guidance_scale"].ge, field["guidance_scale"].le) == (1.5, 1.0, 3.0)
    steps = field["inference_steps"]
    assert (steps.default, steps.ge, steps.le) == (None, 1, 100)  # None: the sampler's own count
    assert (field["seed"].default, field["seed"].ge, field["seed"].le) == (None, 0, 2**32 - 1)
    assert field["loop_mode"].default == "bounce" and field["loop_mode"].choices == list(LOOP_MODES)
    assert field["face_select"].default == "largest" and field["face_select"].choices == list(FACE_SELECTS)
    assert field["enable_deepcache"].default is True and field["keep_fps"].default is False
    assert field["ranges"].default == ""  # empty: the whole video
    assert all(f.description for f in field.values())


def test_each_prediction_gets_a_fresh_folder_and_the_previous_one_goes(predictor, media, metrics):
    first = call(predictor, video=media["clip"], audio=media["speech"], seed=1, **FAST)
    assert first.is_file() and first.suffix == ".mp4"
    streams = probe_streams(first)["streams"]
    assert int(next(s for s in streams if s["codec_type"] == "video")["nb_read_frames"]) == metrics["frames"]
    assert any(s["codec_type"] == "audio" for s in streams)
    second = call(predictor, video=media["clip"], audio=media["speech"], seed=1, **FAST)
    assert second.is_file() and second.name != first.name and second.parent != first.parent
    assert not first.parent.exists()
    assert runs(predictor) == [second.parent.name]


def test_metrics_report_the_seed_frames_and_stage_times(predictor, media, metrics):
    call(predictor, video=media["clip"], audio=media["speech"], seed=1234, **FAST)
    assert metrics["seed"] == 1234
    assert metrics["frames"] > 0 and metrics["frames_with_face"] == metrics["frames"]
    stages = {k.split(".", 1)[1] for k in metrics if k.startswith("seconds.")}
    assert {"faces", "denoise", "mux"} <= stages
    assert {"sync.offset0_cosine", "sync.best_offset", "sync.confidence"} <= set(metrics)
    assert metrics["ranges"] == []  # the whole video
    call(predictor, video=media["clip"], audio=media["speech"], **FAST)
    assert isinstance(metrics["seed"], int)


def test_seed_zero_is_an_ordinary_seed(predictor, media, metrics):
    call(predictor, video=media["clip"], audio=media["speech"], seed=0, **FAST)
    assert metrics["seed"] == 0


def test_logs_show_progress_and_no_temporary_paths(predictor, media, metrics, caplog, monkeypatch):
    monkeypatch.setattr(predict, "PROGRESS_EVERY_PERCENT", 5.0)  # a line each 5 % of a stage's frames
    caplog.set_level(logging.INFO)
    out = call(predictor, video=media["clip"], audio=media["speech"], seed=5, **FAST)
    text = "\n".join(r.getMessage() for r in caplog.records)
    started = [m.group(1) for m in re.finditer(r"^(\w+) started", text, re.M)]
    assert started == ["faces", "synthesis", "encoding"], text  # on the CPU, SyncNet scores during synthesis
    assert re.search(r"^faces \d+ % \(\d+/16 frames\), ETA \d+:\d\d$", text, re.M), text
    assert re.search(r"^synthesis done in \d+:\d\d \(17 frames\)$", text, re.M), text
    assert "<video>" in text and "<output>" in text, text  # the pipeline's own lines, with the paths renamed
    for secret in (str(media["clip"]), media["clip"].name, str(out), out.name, str(predictor.work_root)):
        assert secret not in text
    assert not any(isinstance(h, logging.Handler) and h.filters for h in logging.getLogger().handlers
                   if any(isinstance(f, predict._PathScrubber) for f in h.filters))  # removed after the run


def test_a_silent_stretch_still_gets_a_line(predictor, media, metrics, caplog, monkeypatch):
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)  # a line at every check of the run
    caplog.set_level(logging.INFO)
    call(predictor, video=media["clip"], audio=media["speech"], seed=5, **FAST)
    assert re.search(r"^synthesis 0 % \(0/17 frames\), ETA unknown$",
                     "\n".join(r.getMessage() for r in caplog.records), re.M)


def test_file_extensions_are_not_trusted(predictor, media, metrics, tmp_path):
    video = shutil.copy(media["clip"], tmp_path / "clip.wav")
    audio = shutil.copy(media["speech"], tmp_path / "speech")  # no extension at all, as Cog may deliver it
    out = call(predictor, video=Path(video), audio=Path(audio), seed=2, **FAST)
    assert out.is_file() and metrics["frames_with_face"] > 0


def test_ranges_reach_the_run_and_a_bad_one_is_refused(predictor, media, metrics):
    out = call(predictor, video=media["clip"], audio=media["speech"], seed=2, ranges="0.2-0.4", **FAST)
    assert out.is_file() and metrics["frames_with_face"] == 5  # the frames of the range only
    assert metrics["ranges"] == [[0.2, 0.4]]
    with pytest.raises(InputError, match=r"range '0.2-x': 'x' is not a time"):
        call(predictor, video=media["clip"], audio=media["speech"], ranges="0.2-x", **FAST)


def test_input_error_is_one_line_and_leaves_no_folder(predictor, media):
    with pytest.raises(InputError) as caught:
        call(predictor, video=media["noface"], audio=media["speech"], **FAST)
    message = str(caught.value)
    assert "\n" not in message and "face" in message
    assert "<video>" in message and "noface.mp4" not in message  # the input's name, not a server temp path
    assert runs(predictor) == []


def test_out_of_memory_fails_that_prediction_only(predictor, media, monkeypatch):
    import torch

    freed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(predictor.pipe, "lipsync", oom)
        with pytest.raises(RuntimeError, match="out of GPU memory"):
            call(predictor, video=media["clip"], audio=media["speech"], **FAST)
    assert freed and runs(predictor) == []
    monkeypatch.undo()
    assert call(predictor, video=media["clip"], audio=media["speech"], seed=1, **FAST).is_file()


def test_cancellation_propagates_after_cleaning_up(predictor, media, monkeypatch):
    from cog import CancelationException

    def cancelled(*args, **kwargs):
        raise CancelationException()

    monkeypatch.setattr(predictor.pipe, "lipsync", cancelled)
    with pytest.raises(CancelationException):
        call(predictor, video=media["clip"], audio=media["speech"], **FAST)
    assert runs(predictor) == []


# --- setup ----------------------------------------------------------------------------------------------------------

def test_setup_logs_the_weights_stage(env, caplog):
    caplog.set_level(logging.INFO)
    p = predict.Predictor()
    p.setup()
    shutil.rmtree(p.work_root, ignore_errors=True)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(r"^weights started\n(.*\n)*weights done in \d+:\d\d$", text, re.M), text


def test_setup_refuses_a_sha256_mismatch_naming_the_file(env, tiny, tmp_path):
    weights, _, manifest = tiny
    damaged = shutil.copytree(weights, tmp_path / "damaged")
    data = bytearray((damaged / "mask.png").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "mask.png").write_bytes(bytes(data))
    env.setenv("LATENTSYNC_WEIGHTS_DIR", str(damaged))
    try:
        with pytest.raises(InputError, match=r"mask\.png: sha256 [0-9a-f]{64}, expected"):
            predict.Predictor().setup()
    finally:
        env.setenv("LATENTSYNC_WEIGHTS_DIR", str(weights))
    assert (damaged / "mask.png").read_bytes() == bytes(data)  # reported, never deleted or replaced


def test_setup_loads_from_a_read_only_weights_folder(env, tiny, tmp_path):
    weights, _, _ = tiny
    copy = functools.partial(shutil.copytree, weights, dirs_exist_ok=True)
    with read_only_tmpfs(tmp_path / "ro", copy) as folder:
        env.setenv("LATENTSYNC_WEIGHTS_DIR", str(folder))
        try:
            p = predict.Predictor()
            p.setup()  # verified: no lock file, nothing written
            assert p.pipe.models.version == "1.6"
            shutil.rmtree(p.work_root, ignore_errors=True)
            del p  # its memory-mapped checkpoints keep files on the mount open
            gc.collect()
        finally:
            env.setenv("LATENTSYNC_WEIGHTS_DIR", str(weights))


def test_setup_refuses_a_truncated_file_naming_it(env, tiny, tmp_path):
    weights, _, _ = tiny
    damaged = shutil.copytree(weights, tmp_path / "damaged")
    with open(damaged / "latentsync_unet.pt", "r+b") as f:
        f.truncate(4096)
    env.setenv("LATENTSYNC_WEIGHTS_DIR", str(damaged))
    try:
        with pytest.raises(InputError, match=r"latentsync_unet\.pt: 4096 bytes.*truncated"):
            predict.Predictor().setup()
    finally:
        env.setenv("LATENTSYNC_WEIGHTS_DIR", str(weights))


def test_setup_downloads_into_the_default_folder_through_hf_endpoint(env, tiny, tmp_path, monkeypatch):
    weights, _, _ = tiny
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(weights))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        # The manifest names huggingface.co; HF_ENDPOINT (Replicate's mirror, here a local server) serves it.
        manifest = manifest_for(weights, tmp_path / "weights.txt", "https://huggingface.co")
        env.delenv("LATENTSYNC_WEIGHTS_DIR")
        env.setenv("LATENTSYNC_MANIFEST", str(manifest))
        env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(predict, "WEIGHTS_HOME", tmp_path / "project" / "weights")  # not the checkout's
        p = predict.Predictor()
        p.setup()
        folder = tmp_path / "project" / "weights" / "1.6"
        for dest in DESTS:
            if not (weights / dest).is_file():
                continue
            assert (folder / dest).read_bytes() == (weights / dest).read_bytes()
        assert p.pipe.models.version == "1.6"
        shutil.rmtree(p.work_root, ignore_errors=True)
        # A second boot (the next `cog predict`) finds the folder complete and fetches nothing.
        server.shutdown()
        again = predict.Predictor()
        again.setup()
        shutil.rmtree(again.work_root, ignore_errors=True)
    finally:
        server.shutdown()
        server.server_close()
        env.delenv("HF_ENDPOINT")
        env.setenv("LATENTSYNC_WEIGHTS_DIR", str(weights))
        env.setenv("LATENTSYNC_MANIFEST", str(tiny[2]))


@pytest.mark.parametrize("value, expected", [("1", {"compile": True}), (None, {"compile": False}),
                                             ("0", {"compile": False})])
def test_compile_is_asked_for_only_when_latentsync_compile_is_1(env, monkeypatch, value, expected):
    from latentsync.pipeline import LipSync

    seen = {}

    class Loaded:
        class models:  # noqa: N801 — stands in for LipSync.models
            device, dtype = "cpu", "torch.float32"

    def fake_from_pretrained(weights_dir, **kwargs):
        seen.update(kwargs)
        return Loaded()

    monkeypatch.setattr(LipSync, "from_pretrained", fake_from_pretrained)
    if value is None:
        monkeypatch.delenv("LATENTSYNC_COMPILE", raising=False)
    else:
        monkeypatch.setenv("LATENTSYNC_COMPILE", value)
    p = predict.Predictor()
    p.setup()
    shutil.rmtree(p.work_root, ignore_errors=True)
    assert {k: v for k, v in seen.items() if k == "compile"} == expected


def test_cog_loads_the_predictor_without_deprecation_warnings(tmp_path):
    """Cog 0.20+ warns at every boot that BasePredictor and predict() are its old names for BaseRunner and run();
    the container keeps that form on purpose, so predict.py quiets those two warnings (and only those)."""
    import subprocess

    code = "from cog.predictor import load_predictor_from_ref; load_predictor_from_ref('predict.py:Predictor')"
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BasePredictor is deprecated" not in proc.stderr and "predict() is deprecated" not in proc.stderr


def test_what_earlier_predictions_left_in_the_scratch_folder_goes_with_the_next(predictor, media):
    kept = predictor.scratch / "tmpk2j4file.mp4"  # Cog keeps its input copy after a failed download or early cancel
    kept.write_bytes(b"x")
    (predictor.scratch / "latentsync-old").mkdir()
    assert call(predictor, video=media["clip"], audio=media["speech"], seed=1, **FAST).is_file()
    assert list(predictor.scratch.iterdir()) == []


def test_the_worker_folder_goes_when_the_process_is_killed(tmp_path):
    import subprocess

    folder = tmp_path / "latentsync-cog-x"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / ".video.part.mp4").write_bytes(b"partial")
    code = ("import os, signal, sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); import predict; "
            "predict._remove_at_exit(Path(sys.argv[1])); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(REPO)], timeout=120)
    assert proc.returncode == -9  # killed: no atexit, no finally ran in it
    gone = threading.Event()
    for _ in range(100):  # the reaper removes it within moments of the kill
        if not folder.exists():
            break
        gone.wait(0.1)
    assert not folder.exists()
