"""The CLI's failures: one ``error:`` line naming the real cause, the right exit status, checked before any weights
are read, and nothing of the user's touched; SIGINT/SIGTERM stop a run and leave nothing behind."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from latentsync import InputError
from latentsync.cli import main
from latentsync.media import MediaCaps
from latentsync.preflight import check_inputs
from media_utils import face_clip, speech
from tiny_weights import make_tiny_weights, manifest_for


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"video": face_clip(d / "clip40.mp4", 40), "audio": speech(d / "speech1.wav", 1.0),
            "long_audio": speech(d / "speech6.wav", 6.0)}


@pytest.fixture
def env(weights, tmp_path, monkeypatch):
    """The CLI's environment on the tiny weights: a manifest describing them, nothing else from the caller's."""
    folder, _ = weights
    manifest = manifest_for(folder, tmp_path / "weights.txt")
    for name in [n for n in os.environ if n.startswith("LATENTSYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LATENTSYNC_MANIFEST", str(manifest))
    monkeypatch.setenv("LATENTSYNC_SYNCNET_CONFIG", str(folder / "syncnet.yaml"))
    return dict(os.environ)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``main`` in this process; its exit status (also when argparse exits by itself) and stderr."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A weights folder that does not exist: every check below must fail first, before weights are even looked at.
NO_WEIGHTS = ("--weights-dir", "/nonexistent/weights", "--device", "cpu", "-q")


def test_output_naming_an_existing_folder(env, media, tmp_path, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path, *NO_WEIGHTS)
    assert status == 2 and "is an existing folder" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.txt"], "nothing written into the folder"


def test_output_ending_with_a_slash(env, media, tmp_path, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", f"{tmp_path / 'results'}/", *NO_WEIGHTS)
    assert status == 2 and "ends with a slash" in one_line(err)
    assert not (tmp_path / "results").exists()


def test_output_equal_to_an_input_is_refused_and_the_input_kept(env, media, tmp_path, capsys):
    video = tmp_path / "mine.mp4"
    video.write_bytes(media["video"].read_bytes())
    linked = tmp_path / "linked.mp4"
    os.link(video, linked)  # the same file under another name
    before = digest(video)
    for output in (video, tmp_path / "." / "mine.mp4", linked):
        status, err = run_cli(capsys, video, media["audio"], "-o", output, *NO_WEIGHTS)
        assert status == 2 and "never overwrites its inputs" in one_line(err)
    status, err = run_cli(capsys, media["video"], video, "-o", video, *NO_WEIGHTS)  # the audio input too
    assert status == 2 and "never overwrites" in one_line(err)
    assert digest(video) == before


def test_output_folder_below_a_file(env, media, tmp_path, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", media["video"] / "out.mp4", *NO_WEIGHTS)
    assert status == 2 and "is a file, not a folder" in one_line(err)


def test_output_extension_that_cannot_hold_h264_and_aac(env, media, tmp_path, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "out.txt", *NO_WEIGHTS)
    assert status == 2 and ".mp4, .mov, .mkv or .m4v" in one_line(err) and ".txt" in one_line(err)


def _tmpfs(target: Path, options: str):
    """Mount a tmpfs at ``target`` for the test (root ignores chmod, not a mount); skipped where not allowed."""
    target.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "ro,size=1m")


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path / "small", "size=64k")


def test_output_in_a_read_only_folder(env, media, read_only_dir, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", read_only_dir / "out.mp4", *NO_WEIGHTS)
    assert status == 2 and "read-only file system" in one_line(err)
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", read_only_dir / "new" / "out.mp4",
                          *NO_WEIGHTS)
    line = one_line(err)
    assert status == 2 and "cannot create the output folder" in line and "read-only" in line


def test_a_temporary_folder_without_room_is_exit_1_before_any_weights(env, media, tmp_path, small_disk, capsys,
                                                                       monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # what TMPDIR sets
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    line = one_line(err)
    assert status == 1 and "no space left" in line and str(small_disk) in line and "TMPDIR" in line


def test_an_output_disk_without_room_is_exit_1(env, media, small_disk, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", small_disk / "o.mp4", *NO_WEIGHTS)
    assert status == 1 and "no space left" in one_line(err) and str(small_disk) in one_line(err)


@pytest.mark.parametrize("args, words", [
    (("--device", "tpu"), "unknown device 'tpu'"),
    (("--device", "mps"), "MPS is not available"),
    (("--guidance-scale", "inf"), "guidance_scale must be a finite number"),
    (("--guidance-scale", "7"), "guidance_scale must be between 1 and 3"),
    (("--face-point", "nan", "nan"), "face_point must be a finite number"),
    (("--seed", "-1"), "seed must be between 0 and 4294967295"),
    (("--inference-steps", "0"), "inference_steps must be between 1 and 100"),
    (("--guidance-until", "2"), "guidance_until must be a fraction of the steps between 0 and 1"),
    (("--sampler", "euler"), "invalid choice: 'euler'"),
    (("--unet-config", "/nonexistent/unet.yaml"), "--unet-config /nonexistent/unet.yaml does not exist"),
    (("--seed", "abc"), "invalid int value: 'abc'"),
    (("--version", "1.7"), "--version must be one of 1.5, 1.6, not '1.7'"),
])
def test_bad_options_are_one_line_before_any_weights(env, media, tmp_path, capsys, args, words):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", *args,
                          "--weights-dir", "/nonexistent/weights", "-q")
    assert status == 2 and words in one_line(err)


def test_unet_config_from_the_environment_is_named_as_such(env, media, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTSYNC_UNET_CONFIG", "/nonexistent/unet.yaml")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "LATENTSYNC_UNET_CONFIG /nonexistent/unet.yaml does not exist" in one_line(err)


def test_a_bad_version_from_the_environment_is_named_as_such(env, media, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTSYNC_VERSION", "1.7")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "LATENTSYNC_VERSION must be one of 1.5, 1.6, not '1.7'" in one_line(err)


def test_cuda_on_a_machine_without_one(env, media, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--device", "cuda",
                          "--weights-dir", "/nonexistent/weights", "-q")
    line = one_line(err)
    assert status == 2 and "'cuda'" in line and "device 'cpu'" in line


def test_missing_video_is_named_before_any_download(env, media, tmp_path):
    """No weights folder given: the CLI would download; a missing input must stop it first (the manifest's
    URLs point at a closed port, so a download attempt would show up as a network error, not this)."""
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout, from another cwd
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # where the CLI would download to
    proc = subprocess.run([sys.executable, "-m", "latentsync", str(tmp_path / "missing.mp4"), str(media["audio"]),
                           "-o", str(tmp_path / "o.mp4"), "-q"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing.mp4 does not exist" in one_line(proc.stderr)
    assert not (tmp_path / "cache").exists(), "a weights folder was created before the inputs were checked"


def test_download_failure_is_exit_1(env, media, tmp_path, capsys, monkeypatch):
    import latentsync.download

    def offline(*args, **kwargs):
        raise RuntimeError("could not download mask.png from http://127.0.0.1:9/mask.png: connection refused")

    monkeypatch.setattr(latentsync.download, "ensure_weights", offline)
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--device", "cpu", "-q")
    assert status == 1 and "could not download mask.png" in one_line(err)


def test_full_disk_during_the_run_is_exit_1(env, weights, media, tmp_path, capsys, monkeypatch):
    import errno

    from latentsync.pipeline import LipSync

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "o.mp4"))

    monkeypatch.setattr(LipSync, "run", full)
    folder, cfg = weights
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--weights-dir", folder,
                          "--unet-config", cfg, "--device", "cpu", "-q")
    assert status == 1 and "No space left on device" in one_line(err)


def test_options_reach_the_pipeline_as_one_run_options(env, weights, media, tmp_path, capsys, monkeypatch):
    from latentsync.options import RunOptions
    from latentsync.pipeline import LipSync

    seen = {}

    def record(self, inputs, options, *, cancel=None, progress=False, **overrides):
        seen.update(options=options, overrides=overrides, cancel=cancel, progress=progress)
        raise InputError("stop here")

    monkeypatch.setattr(LipSync, "run", record)  # the CLI hands the files it checked to LipSync.run
    folder, cfg = weights
    status, _ = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--weights-dir", folder,
                        "--unet-config", cfg, "--device", "cpu", "--seed", "5", "--face-point", "10", "20", "-q")
    assert status == 2
    assert seen["options"] == RunOptions(seed=5, face_point=(10.0, 20.0)) and seen["overrides"] == {}
    assert seen["cancel"] is not None and not seen["cancel"].is_set()
    assert seen["progress"] is False  # -q: no bars
    run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--weights-dir", folder,
            "--unet-config", cfg, "--device", "cpu")
    assert seen["progress"] is True


def test_the_api_checks_paths_before_reading_a_frame(weights, media, tmp_path):
    from latentsync.pipeline import LipSync

    folder, cfg = weights
    pipe = LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu")
    with pytest.raises(InputError, match="existing folder"):
        pipe.lipsync(media["video"], media["audio"], tmp_path, inference_steps=2)
    with pytest.raises(InputError, match="never overwrites"):
        pipe.lipsync(media["video"], media["audio"], media["video"], inference_steps=2)


def test_an_existing_output_is_refused_unless_overwrite_is_given(env, weights, media, tmp_path, capsys, monkeypatch):
    from latentsync.pipeline import LipSync

    out = tmp_path / "mine.mp4"
    out.write_bytes(b"the user's own file")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", out, *NO_WEIGHTS)
    assert status == 2 and "already exists" in one_line(err) and "--overwrite" in one_line(err)
    assert out.read_bytes() == b"the user's own file"
    seen = []
    monkeypatch.setattr(LipSync, "run", lambda self, inputs, *a, **k: seen.append(inputs.output) or 1 / 0)
    folder, cfg = weights
    with pytest.raises(ZeroDivisionError):  # past the check: the run itself was reached
        run_cli(capsys, media["video"], media["audio"], "-o", out, "--overwrite", "--weights-dir", folder,
                "--unet-config", cfg, "--device", "cpu", "-q")
    assert seen == [out]


def test_the_api_refuses_an_existing_output_unless_overwrite(media, tmp_path):
    out = tmp_path / "mine.mkv"
    out.write_bytes(b"x")
    with pytest.raises(InputError, match="already exists"):
        check_inputs(media["video"], media["audio"], out, MediaCaps())
    os.symlink(tmp_path / "nowhere.mp4", tmp_path / "link.mp4")  # a dangling link is a file the rename would replace
    with pytest.raises(InputError, match="already exists"):
        check_inputs(media["video"], media["audio"], tmp_path / "link.mp4", MediaCaps())
    assert check_inputs(media["video"], media["audio"], out, MediaCaps(), overwrite=True).output == out


def test_an_output_name_with_bytes_that_are_not_utf8(env, media, tmp_path, capsys):
    latin1 = os.fsdecode(b"caf\xe9.mp4")  # as argv gives it: a surrogate escape
    (tmp_path / latin1).write_bytes(b"x")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / latin1, *NO_WEIGHTS)
    assert status == 2 and "already exists" in one_line(err)
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / os.fsdecode(b"n\xe9w.mp4"),
                          *NO_WEIGHTS)
    assert status == 2 and "weights" in one_line(err), "the output's checks passed; the weights folder is missing"
    long = os.fsdecode(b"\xe9" * 300 + b".mp4")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / long, *NO_WEIGHTS)
    assert status == 2 and "304 bytes long" in one_line(err)


def test_the_audio_is_checked_with_the_other_files_before_any_weights(env, media, tmp_path, capsys, monkeypatch):
    status, err = run_cli(capsys, media["video"], media["video"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "clip40.mp4' has no audio track" in one_line(err)  # a clip without sound
    monkeypatch.setenv("LATENTSYNC_MAX_DURATION", "3")
    status, err = run_cli(capsys, media["video"], media["long_audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "speech6.wav' lasts 6.0 s; the limit is 3 s" in one_line(err)


def test_check_inputs_accepts_a_new_nested_output(media, tmp_path):
    out = tmp_path / "a" / "b" / "out.MP4"
    inputs = check_inputs(media["video"], media["audio"], out, MediaCaps())
    assert (inputs.video, inputs.audio, inputs.output) == (media["video"], media["audio"], out)
    assert not (tmp_path / "a").exists(), "checking creates nothing"
    with pytest.raises(InputError, match="audio .* does not exist"):
        check_inputs(media["video"], tmp_path / "none.wav", out, MediaCaps())


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_and_leaves_nothing(env, weights, media, tmp_path, signum, status):
    psutil = pytest.importorskip("psutil")
    folder, cfg = weights
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentsync", str(media["video"]), str(media["long_audio"]), "-o",
         str(out_dir / "o.mp4"), "--weights-dir", str(folder), "--unet-config", str(cfg), "--device", "cpu",
         "--inference-steps", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "TMPDIR": str(tmp)})
    # Wait until the synthesis stage has started: its progress bar appears once the encoder is running.
    seen = b""
    while b"synthesis" not in seen:
        chunk = proc.stderr.read1(65536)
        if not chunk:
            break
        seen += chunk
    children = psutil.Process(proc.pid).children(recursive=True)
    names = [_name(c) for c in children]
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=120)
    stderr = (seen + rest).decode(errors="replace")
    assert b"synthesis" in seen, f"the run never reached the synthesis stage: {stderr[-2000:]}"
    assert proc.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted by {signal.Signals(signum).name}"), last
    assert list(out_dir.iterdir()) == [], "an output or partial file was left"
    assert not [p for p in tmp.iterdir() if p.name.startswith("latentsync-")], "a temporary folder was left"
    assert any("ffmpeg" in n for n in names), f"ffmpeg should have been running at the signal, not just {names}"
    alive = [n for c, n in zip(children, names, strict=True) if _alive(c)]
    assert not alive, f"processes left running: {alive}"


_SIGNALS_AT_THE_END = """
import atexit, os, signal, sys
from pathlib import Path
import latentsync.cli as cli
from latentsync.settings import Settings

def run(self, inputs, options, **kwargs):  # the output written, then SIGTERM before the run returns
    Path(inputs.output).write_bytes(b"done")
    os.kill(os.getpid(), signal.SIGTERM)

def summary(result):  # SIGTERM while the summary prints
    os.kill(os.getpid(), signal.SIGTERM)
    return ["summary"]

Settings.weights = lambda self: None
Settings.load = lambda self, weights: type("Pipe", (), {"run": run})()
cli.summary_lines = summary
atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C during the interpreter's teardown
sys.argv = ["latentsync", *sys.argv[1:]]
cli.entry()
"""


def test_signals_once_the_output_is_written_end_the_run_with_0(env, media, tmp_path):
    out = tmp_path / "o.mp4"
    proc = subprocess.run([sys.executable, "-c", _SIGNALS_AT_THE_END, str(media["video"]), str(media["audio"]),
                           "-o", str(out), "--device", "cpu", "-q"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "summary\n", "")
    assert out.read_bytes() == b"done"


def _name(process) -> str:
    import psutil

    try:
        return process.name()
    except psutil.NoSuchProcess:
        return "(gone)"


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_api_names_a_missing_config(weights):
    from latentsync.pipeline import LipSync

    folder, _ = weights
    with pytest.raises(InputError, match="config file /nonexistent/unet.yaml does not exist"):
        LipSync.from_pretrained(folder, unet_config="/nonexistent/unet.yaml", device="cpu")


def test_an_output_name_longer_than_the_file_system_takes_is_refused_up_front(env, media, tmp_path, capsys):
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / ("n" * 300 + ".mp4"),
                          *NO_WEIGHTS)
    assert status == 2 and "choose a shorter name" in one_line(err)


def test_a_fifo_given_as_the_video_is_named_as_such(env, media, tmp_path, capsys):
    fifo = tmp_path / "video.mp4"
    os.mkfifo(fifo)
    status, err = run_cli(capsys, fifo, media["audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "is not a regular file" in one_line(err)


def test_a_malformed_unet_config_is_one_line_before_any_weights(env, media, tmp_path, capsys):
    config = tmp_path / "unet.yaml"
    config.write_text("model: [unclosed\n")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--unet-config", config,
                          *NO_WEIGHTS)
    assert status == 2 and f"--unet-config {config} is not a readable YAML file" in one_line(err)


def test_a_text_file_standing_as_the_unet_checkpoint_is_one_line(env, weights, media, tmp_path, capsys,
                                                                  monkeypatch):
    folder, cfg = weights
    copy = tmp_path / "w"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    (copy / "latentsync_unet.pt").write_text("this is text, not a checkpoint\n")
    manifest = Path(env["LATENTSYNC_MANIFEST"])
    lines = [" ".join([*line.split()[:3], "-", "-"]) if "latentsync_unet.pt" in line else line
             for line in manifest.read_text().splitlines()]  # a manifest line without size or digest
    manifest.write_text("\n".join(lines) + "\n")
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--weights-dir", copy,
                          "--unet-config", cfg, "--device", "cpu", "-q")
    assert status == 2 and "latentsync_unet.pt is not a PyTorch checkpoint" in one_line(err)


def test_a_quiet_run_prints_nothing_but_its_result_and_leaves_the_temporary_folder_as_it_was(env, weights, media,
                                                                                            tmp_path):
    folder, cfg = weights
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "latentsync", str(media["video"]), str(media["audio"]), "-o",
                           str(tmp_path / "o.mp4"), "--weights-dir", str(folder), "--unet-config", str(cfg),
                           "--device", "cpu", "--seed", "1", "-q"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "TMPDIR": str(temp)}, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("wrote ")
    assert proc.stderr == ""  # mediapipe's and TFLite's start-up lines included
    assert list(temp.iterdir()) == []  # no torchinductor_<user>/ either


def test_loading_logs_no_line_about_a_model_dict(weights, caplog):
    import logging

    from latentsync.loader import load_models

    folder, cfg = weights
    with caplog.at_level(logging.INFO):
        load_models(folder, "1.6", "cpu", None, cfg, folder / "syncnet.yaml")
    assert not [r for r in caplog.records if "model: dict" in r.getMessage()]


def test_help_ends_every_option_with_its_default():
    from latentsync.cli import build_parser

    text = build_parser().format_help()
    options = re.split(r"\n(?=  -)", text.split("options:", 1)[1])  # one entry per option, its help wrapped below
    entries = {entry.split()[0]: " ".join(entry.split()) for entry in options if entry.strip()}
    assert len(entries) >= 19, entries.keys()
    no_default = [name for name, entry in entries.items()
                  if "(default: " not in entry and name not in ("-h,", "-o")]  # --help; the required output
    assert not no_default, no_default
    assert "(default: 1.5)" in entries["--guidance-scale"] and "(default: ddim)" in entries["--sampler"]
    assert "(default: the sampler's: ddim 20, dpmpp_2m 10, unipc 10)" in entries["--inference-steps"]


def _cli_in_a_fresh_process(*args: str, env=None) -> tuple[int, bool, float, str]:
    """The CLI in a new interpreter: its status, whether torch got imported, the seconds main() took, stderr."""
    code = ("import sys, time; from latentsync.cli import main; t = time.perf_counter(); s = main(sys.argv[1:]); "
            "print(s, 'torch' in sys.modules, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    status, torch_imported, seconds = proc.stdout.split()
    return int(status), torch_imported == "True", float(seconds), proc.stderr


@pytest.mark.parametrize("device, words", [("tpu", "unknown device 'tpu'"), ("cuda", "asked for, but"),
                                           ("mps", "MPS is not available")])
def test_a_device_this_machine_lacks_fails_before_torch_is_imported(env, media, tmp_path, device, words):
    from latentsync.hardware import check_device_available

    if device != "tpu":
        try:
            check_device_available(device)
            pytest.skip(f"this machine may have {device}")
        except InputError:
            pass
    status, torch_imported, seconds, stderr = _cli_in_a_fresh_process(
        str(media["video"]), str(media["audio"]), "-o", str(tmp_path / "o.mp4"), "--device", device,
        "--weights-dir", "/nonexistent/weights", "-q", env=env)
    line = one_line(stderr)
    assert status == 2 and words in line and (device == "tpu" or line.endswith("run on the CPU (device 'cpu') or "
                                                                                "leave the device out"))
    assert not torch_imported, "torch was imported before the device was turned down"
    print(f"--device {device}: turned down in {seconds * 1000:.0f} ms")


def test_a_torch_build_without_cuda_is_read_without_importing_it(tmp_path, monkeypatch):
    import importlib.util

    from latentsync import hardware

    package = tmp_path / "torch"
    package.mkdir()
    spec = importlib.util.spec_from_file_location("torch", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    for cuda, hip, built in (("None", "None", False), ("'12.8'", "None", True), ("None", "'6.2'", True)):
        (package / "version.py").write_text(f"__version__ = '2.13.0'\ncuda: Optional[str] = {cuda}\n"
                                            f"hip: Optional[str] = {hip}\n")
        assert hardware.torch_gpu_build() is built
    (package / "version.py").write_text("__version__ = '2.13.0'\n")
    assert hardware.torch_gpu_build() is None  # the file does not say: torch decides


@pytest.mark.parametrize("build, driver, platform, device, words", [
    (False, True, "linux", "cuda", "this torch build has no CUDA support"),
    (True, False, "linux", "cuda:1", "no CUDA GPU is visible on this machine (no GPU driver is installed)"),
    (True, True, "linux", "cuda", None),
    (None, None, "win32", "cuda", None),  # only torch can tell: it is asked later
    (None, None, "linux", "mps", "Apple's MPS is not available on this machine"),
    (None, None, "darwin", "mps", None),
    (False, False, "linux", "cpu", None),
    (False, False, "linux", None, None),
])
def test_only_a_certainly_missing_device_is_turned_down_early(monkeypatch, build, driver, platform, device, words):
    from latentsync import hardware

    monkeypatch.setattr(hardware, "torch_gpu_build", lambda: build)
    monkeypatch.setattr(hardware, "gpu_driver_present", lambda: driver)
    monkeypatch.setattr(hardware.sys, "platform", platform)
    if words is None:
        hardware.check_device_available(device)
        return
    with pytest.raises(InputError) as caught:
        hardware.check_device_available(device)
    assert str(caught.value) == f"device {device!r} asked for, but {words}; run on the CPU (device 'cpu') or " \
                                f"leave the device out"


def test_a_weights_folder_that_describes_itself_runs_with_only_its_name(weights, media, tmp_path, capsys,
                                                                       monkeypatch):
    from latentsync.pipeline import LipSync

    seen = {}

    def record(self, *args, **kwargs):
        seen.update(resolution=self.models.resolution, syncnet=self.models.syncnet is not None)
        raise InputError("stop here")

    for name in [n for n in os.environ if n.startswith("LATENTSYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(LipSync, "run", record)
    folder, _ = weights
    status, err = run_cli(capsys, media["video"], media["audio"], "-o", tmp_path / "o.mp4", "--weights-dir", folder,
                          "--device", "cpu", "-q")
    assert (status, one_line(err)) == (2, "error: stop here")
    assert seen == {"resolution": 64, "syncnet": True}  # its own manifest, U-Net config and SyncNet config


def test_the_api_loads_a_self_describing_folder_from_its_name_alone(weights):
    from latentsync.pipeline import LipSync

    folder, _ = weights
    pipe = LipSync.from_pretrained(folder, device="cpu")
    assert pipe.models.resolution == 64 and pipe.models.syncnet is not None
