"""The container's HTTP contract, against Cog's real server (``python -m cog.server.http``) run in-process.

The server runs ``predict.py`` from a temporary copy of the project whose ``.cog/openapi_schema.json`` is written
here by Cog's own static parser (``../shared/cog/bin/staticschema``: exactly what ``cog build`` writes; skipped where
``../shared`` is absent), on tiny random weights in a temporary ``LATENTSYNC_WEIGHTS_DIR``. One server serves most
cases; a second one checks that damaged weights fail setup.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

import cog_parser
from conftest import REPO
from media_utils import face_clip, probe_streams, tone, write_clip
from tiny_weights import make_tiny_weights, manifest_for

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 600  # a cold start imports torch, mediapipe and diffusers on a busy 2-core machine
SAMPLE_VIDEO = REPO / "samples" / "face.mp4"
SAMPLE_AUDIO = REPO / "samples" / "speech.wav"
FAST = {"inference_steps": 10, "guidance_scale": 1.0}  # few steps and no guidance: cheap on CPU


# --- pieces a test server needs ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """``python -m cog.server.http`` in a temporary project folder, with its own TMPDIR and log file."""

    def __init__(self, root: Path, weights: Path, unet_config: Path, manifest: Path):
        self.root = root
        self.project = root / "project"
        self.tmp = root / "tmp"
        self.log = root / "server.log"
        self.project.mkdir(parents=True)
        self.tmp.mkdir()
        shutil.copy(REPO / "predict.py", self.project / "predict.py")
        self.schema = cog_parser.write_schema(self.project)  # exactly what `cog build` writes for predict.py
        self.port = free_port()
        # PYTHONPATH: this checkout's latentsync, whatever the environment has installed (e.g. another editable copy).
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
               "COG_PREDICT_TYPE_STUB": "predict.py:Predictor", "PORT": str(self.port), "TMPDIR": str(self.tmp),
               "LATENTSYNC_WEIGHTS_DIR": str(weights), "LATENTSYNC_UNET_CONFIG": str(unet_config),
               "LATENTSYNC_MANIFEST": str(manifest), "LATENTSYNC_VERSION": "1.6", "OMP_NUM_THREADS": "2"}
        if (weights / "syncnet.yaml").is_file():  # a config named in the environment must exist (the CLI's rule)
            env["LATENTSYNC_SYNCNET_CONFIG"] = str(weights / "syncnet.yaml")
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                                     cwd=self.project, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_for(self, *states: str, timeout: float = READY_TIMEOUT_S) -> dict:
        """Poll the health check until it reports one of ``states`` (the server's own readiness signal)."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"cog server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                health = self.get("/health-check")
                if health["status"] in states:
                    return health
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            pause.wait(0.2)
        pytest.fail(f"health never reached {states}:\n{self.log.read_text()[-3000:]}")

    def wait_for_setup_log(self, text: str, timeout: float = 60) -> str:
        """Wait until the worker's setup log line holding ``text`` reached the server: in the health check's setup
        logs, or (a line the worker wrote just as setup() returned may miss those) the server's own log."""
        deadline, pause = time.monotonic() + timeout, threading.Event()
        while True:
            logs = (self.get("/health-check")["setup"].get("logs") or "") + "\n" + self.log.read_text(errors="replace")
            found = next((line for line in logs.splitlines() if text in line), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} never reached the server's logs:\n{logs[-3000:]}")
            pause.wait(0.2)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None, headers: dict | None = None,
             timeout: float = 600) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.base + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def predict(self, **inputs) -> dict:
        # coglet frees the slot just after answering: a request sent at once would get 409 "At capacity".
        self.wait_for("READY", timeout=60)
        status, body = self.post("/predictions", {"input": inputs})
        assert status == 200, body
        return body

    def child_programs(self) -> list[str]:
        """Names of every process below the server (its worker, and the worker's ffmpeg children)."""
        import psutil

        names = []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return names
        for child in children:
            try:
                names.append(child.name())
            except psutil.NoSuchProcess:  # it ended between the listing and the question
                pass
        return names

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class WebhookSink(http.server.ThreadingHTTPServer):
    """Collects webhook bodies per prediction id; waiters block on a condition, not on sleeps."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.events: dict[str, list[dict]] = {}
        self.changed = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait_for_status(self, prediction_id: str, statuses: set[str], timeout: float = 600) -> dict:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(e.get("status") in statuses for e in self.events.get(prediction_id, [])), timeout)
            assert found, f"no {statuses} webhook for {prediction_id}: {self.events.get(prediction_id)}"
            return next(e for e in self.events[prediction_id] if e.get("status") in statuses)


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    server: WebhookSink

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with self.server.changed:
            self.server.events.setdefault(body.get("id", ""), []).append(body)
            self.server.changed.notify_all()
        self.send_response(200)
        self.end_headers()


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def decode_output(uri: str, path: Path) -> Path:
    assert uri.startswith("data:"), uri[:80]
    path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    return path


# --- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Without SyncNet: scoring is the pipeline's business (tests/test_pipeline.py); here it only slows setup.
    weights, unet_config = make_tiny_weights(tmp_path_factory.mktemp("tiny-weights"), syncnet=False)
    manifest = manifest_for(weights, tmp_path_factory.mktemp("manifest") / "weights.txt")
    return weights, unet_config, manifest


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    gray = [np.full((240, 320, 3), 120, np.uint8) for _ in range(20)]
    (d / "notes.txt").write_text("these are meeting notes, not audio\n" * 20)
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(20_000))
    with wave.open(str(d / "empty.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    return {"short": face_clip(d / "short.mp4", 16), "tone_short": tone(d / "short.wav", 0.6),
            "long": face_clip(d / "long.mp4", 250), "tone_long": tone(d / "long.wav", 10.0),
            "noface": write_clip(d / "noface.mp4", gray), "notes": d / "notes.txt", "corrupt": d / "corrupt.mp4",
            "empty": d / "empty.wav", "dir": d}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    weights, unet_config, manifest = tiny
    srv = CogServer(tmp_path_factory.mktemp("cog"), weights, unet_config, manifest)
    started = time.monotonic()
    try:
        health = srv.wait_for("READY", "SETUP_FAILED")
        assert health["status"] == "READY", health["setup"]["logs"][-3000:]
        srv.ready_after_s = time.monotonic() - started
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sink():
    srv = WebhookSink()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


# --- the contract ---------------------------------------------------------------------------------------------------

def test_health_reaches_ready_after_setup(server):
    # READY and a succeeded setup are what the server guarantees once setup() returned; the worker's log lines
    # reach the server on their own stream and may arrive just after, so wait for them instead of expecting them.
    health = server.get("/health-check")
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"
    setup_line = server.wait_for_setup_log("setup done in")
    print(f"cog server READY {server.ready_after_s:.1f} s after start (tiny weights); {setup_line}")
    # The SDK's warnings that BasePredictor and predict() are Cog's old names are quieted by predict.py.
    logs = server.get("/health-check")["setup"]["logs"]
    assert "DeprecationWarning" not in logs and "BasePredictor is deprecated" not in logs, logs


def test_schema_served_with_bounds_and_choices(server):
    served = server.get("/openapi.json")
    assert served["components"]["schemas"]["Input"] == server.schema["components"]["schemas"]["Input"]
    props = cog_parser.inputs(served)
    assert (props["guidance_scale"]["minimum"], props["guidance_scale"]["maximum"]) == (1.0, 3.0)
    assert (props["inference_steps"]["minimum"], props["inference_steps"]["maximum"]) == (1, 100)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (0, 2**32 - 1)
    assert props["loop_mode"]["enum"] == ["bounce", "loop", "cut_off", "silence"]
    assert props["face_select"]["enum"] == ["largest", "active_speaker"]
    assert props["video"]["format"] == "uri" and props["audio"]["format"] == "uri"


def test_samples_lipsync_over_data_uris(server, tmp_path):
    if not (SAMPLE_VIDEO.is_file() and SAMPLE_AUDIO.is_file()):
        pytest.skip("samples/face.mp4 and samples/speech.wav are not in the repository yet")
    body = server.predict(video=data_uri(SAMPLE_VIDEO, "video/mp4"), audio=data_uri(SAMPLE_AUDIO, "audio/wav"),
                          seed=11, **FAST)
    assert body["status"] == "succeeded", body.get("error")
    metrics = body["metrics"]
    assert metrics["seed"] == 11 and metrics["frames"] > 0 and 0 < metrics["frames_with_face"] <= metrics["frames"]
    assert {"faces", "denoise", "mux"} <= set(metrics["seconds"])
    assert metrics["ranges"] == []  # the whole video
    out = decode_output(body["output"], tmp_path / "out.mp4")
    streams = probe_streams(out)["streams"]
    video = [s for s in streams if s["codec_type"] == "video"]
    assert len(video) == 1 and int(video[0]["nb_read_frames"]) == metrics["frames"]
    assert any(s["codec_type"] == "audio" for s in streams)
    speech_s = float(probe_streams(SAMPLE_AUDIO)["format"]["duration"])
    assert abs(metrics["frames"] - speech_s * 25) <= 2  # default loop mode: the audio sets the length


def test_generated_clip_succeeds_and_reports_a_random_seed(server, media, tmp_path):
    body = server.predict(video=data_uri(media["short"], "video/mp4"), audio=data_uri(media["tone_short"], "audio/wav"),
                          **FAST)
    assert body["status"] == "succeeded", body.get("error")
    assert isinstance(body["metrics"]["seed"], int)
    assert body["metrics"]["ranges"] == []  # the whole video
    out = decode_output(body["output"], tmp_path / "out.mp4")
    streams = probe_streams(out)["streams"]
    assert int(next(s for s in streams if s["codec_type"] == "video")["nb_read_frames"]) == body["metrics"]["frames"]
    assert any(s["codec_type"] == "audio" for s in streams)


def test_missing_input_and_out_of_range_value_answer_422(server, media):
    status, body = server.post("/predictions", {"input": {"audio": data_uri(media["tone_short"], "audio/wav")}})
    assert status == 422 and any(d["loc"][-1] == "video" for d in body["detail"])
    files = {"video": str(media["short"]), "audio": str(media["tone_short"])}  # local paths: Cog accepts them too
    status, body = server.post("/predictions", {"input": {**files, "guidance_scale": 9}})
    assert status == 422 and any(d["loc"][-1] == "guidance_scale" for d in body["detail"])
    status, body = server.post("/predictions", {"input": {**files, "loop_mode": "spiral"}})
    assert status == 422 and any(d["loc"][-1] == "loop_mode" for d in body["detail"])


@pytest.mark.parametrize("video, audio, words", [
    ("corrupt", "tone_short", "corrupt.mp4|video"),
    ("noface", "tone_short", "no face"),
    ("short", "notes", "audio"),
    ("short", "empty", "no audio samples|empty"),
])
def test_unusable_media_fail_with_a_readable_reason(server, media, video, audio, words):
    body = server.predict(video=data_uri(media[video], "video/mp4"), audio=data_uri(media[audio], "audio/wav"), **FAST)
    assert body["status"] == "failed"
    error = body["error"]
    assert "\n" not in error and "Traceback" not in error and len(error) < 600, error
    assert re.search(words, error, re.IGNORECASE), error
    # coglet 0.23.1 puts its prefix on every failure twice (README, Cog section); after it, the CLI's one line.
    assert re.fullmatch(r"Prediction failed: Prediction failed: InputError: (?!.*(Prediction failed|InputError)).+",
                        error), error
    print(f"{video} + {audio}: {error}")
    assert server.wait_for("READY", timeout=60)["status"] == "READY"  # the slot is freed just after the reply


def test_async_prediction_reports_success_through_the_webhook(server, sink, media):
    status, body = server.post("/predictions", {"id": "async-ok", "webhook": sink.url,
                                                "input": {"video": data_uri(media["short"], "video/mp4"),
                                                          "audio": data_uri(media["tone_short"], "audio/wav"),
                                                          "seed": 5, **FAST}},
                               headers={"Prefer": "respond-async"})
    assert status == 202, body
    final = sink.wait_for_status("async-ok", {"succeeded", "failed", "canceled"})
    assert final["status"] == "succeeded", final.get("error")
    assert final["output"].startswith("data:video/mp4") and final["metrics"]["seed"] == 5
    assert server.wait_for("READY", timeout=60)["status"] == "READY"


def test_cancel_stops_a_running_prediction_and_its_ffmpeg(server, sink, media):
    status, _ = server.post("/predictions", {"id": "to-cancel", "webhook": sink.url,
                                             "input": {"video": data_uri(media["long"], "video/mp4"),
                                                       "audio": data_uri(media["tone_long"], "audio/wav"),
                                                       "inference_steps": 50, "guidance_scale": 3.0,
                                                       "enable_deepcache": False}},
                            headers={"Prefer": "respond-async"})
    assert status == 202
    # Cancel once the worker is decoding or encoding video: an ffmpeg child proves the run is under way (the pinned
    # binary's name is imageio-ffmpeg's "ffmpeg-linux-x86_64-v7.0.2", hence a substring).
    deadline, pause = time.monotonic() + 300, threading.Event()
    while not [name for name in server.child_programs() if "ffmpeg" in name]:
        assert time.monotonic() < deadline, "the prediction never started ffmpeg"
        pause.wait(0.05)
    status, _ = server.post("/predictions/to-cancel/cancel")
    assert status == 200
    final = sink.wait_for_status("to-cancel", {"succeeded", "failed", "canceled"}, timeout=120)
    assert final["status"] == "canceled", final
    assert server.wait_for("READY", timeout=60)["status"] == "READY"
    assert not [name for name in server.child_programs() if "ffmpeg" in name or "ffprobe" in name]


def test_twenty_predictions_leave_no_growth_in_temporary_folders(server, media):
    inputs = {"video": data_uri(media["short"], "video/mp4"), "audio": data_uri(media["tone_short"], "audio/wav"),
              "seed": 3, **FAST}
    assert server.predict(**inputs)["status"] == "succeeded"
    files, size = tree_size(server.tmp)
    for _ in range(20):
        body = server.predict(**inputs)
        assert body["status"] == "succeeded", body.get("error")
    files_after, size_after = tree_size(server.tmp)
    assert files_after == files, f"{files} → {files_after} files under TMPDIR"
    assert size_after <= size * 1.05 + 4096, f"{size} → {size_after} bytes under TMPDIR"


def test_cog_itself_drops_a_misspelled_input_before_predict_sees_it(server):
    # The README says so: coglet strips input names its schema lacks, and only its own log names them (no hook,
    # no strict mode). Here the request lacks the files, so the answer is 422 and no prediction runs.
    status, body = server.post("/predictions", {"input": {"range": "1-2"}})
    assert status == 422 and {d["loc"][-1] for d in body["detail"]} == {"video", "audio"}
    deadline, pause = time.monotonic() + 30, threading.Event()
    while not re.search(r"Stripped unknown input fields.*range", server.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, "coglet no longer logs the inputs it strips: check the README"
        pause.wait(0.1)


# --- a server stopped: a third server, on the tiny weights -----------------------------------------------------------

def test_a_server_stopped_mid_prediction_leaves_nothing_in_its_temporary_folder(tiny, media, tmp_path, sink):
    weights, unet_config, manifest = tiny
    srv = CogServer(tmp_path / "cog", weights, unet_config, manifest)
    try:
        assert srv.wait_for("READY", "SETUP_FAILED")["status"] == "READY"
        # A finished prediction's output, which Cog does not delete, and then a prediction under way.
        files = {"video": data_uri(media["short"], "video/mp4"), "audio": data_uri(media["tone_short"], "audio/wav")}
        assert srv.predict(**files, **FAST)["status"] == "succeeded"
        status, _ = srv.post("/predictions", {"id": "to-stop", "webhook": sink.url,
                                              "input": {"video": data_uri(media["long"], "video/mp4"),
                                                        "audio": data_uri(media["tone_long"], "audio/wav"),
                                                        "inference_steps": 50, "enable_deepcache": False}},
                             headers={"Prefer": "respond-async"})
        assert status == 202
        deadline, pause = time.monotonic() + 300, threading.Event()
        while not [name for name in srv.child_programs() if "ffmpeg" in name]:
            assert time.monotonic() < deadline, "the prediction never started ffmpeg"
            pause.wait(0.05)
        assert [p for p in srv.tmp.iterdir() if p.name.startswith("latentsync-cog-")]
        srv.proc.terminate()  # what `docker stop` sends
        srv.proc.wait(timeout=120)
    finally:
        srv.stop()
    # Cog kills a worker still predicting 10 s after the signal; the worker's reaper then removes its folder.
    deadline = time.monotonic() + 30
    while list(srv.tmp.iterdir()):
        assert time.monotonic() < deadline, f"left in TMPDIR: {sorted(map(str, srv.tmp.rglob('*')))}"
        pause.wait(0.1)


# --- setup failures: a second server on damaged weights ---------------------------------------------------------------

def test_setup_with_a_truncated_weight_file_fails_naming_it(tiny, tmp_path):
    weights, unet_config, manifest = tiny
    damaged = shutil.copytree(weights, tmp_path / "damaged")
    with open(damaged / "whisper" / "tiny.pt", "r+b") as f:
        f.truncate(1000)
    srv = CogServer(tmp_path / "cog", damaged, unet_config, manifest)
    try:
        health = srv.wait_for("READY", "SETUP_FAILED")
        assert health["status"] == "SETUP_FAILED"
        srv.wait_for_setup_log("whisper/tiny.pt: 1000 bytes")
        status, _ = srv.post("/predictions", {"input": {"video": "x", "audio": "y"}})
        assert status == 503
    finally:
        srv.stop()

