"""The checks before a run: every file checked once, the video probed once within the deployment's caps, and the
run going on with what that probe found."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from latentsync import InputError, audio, media, video
from latentsync.preflight import Inputs, check_inputs
from media_utils import face_clip, speech
from test_cli import NO_WEIGHTS, env, one_line, run_cli, weights  # noqa: F401 — test_cli's fixtures (F811 below)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {"video": face_clip(d / "clip40.mp4", 40), "audio": speech(d / "speech1.wav", 1.0)}


@pytest.fixture
def probed(monkeypatch) -> list[Path]:
    """The path of every probe made while the test runs."""
    # Every probe, whatever name its caller holds it by, goes through _describe. (``latentsync.video.probe`` as an
    # attribute is the package's function, so the module is taken from importlib.)
    module = importlib.import_module("latentsync.video.probe")
    describe, seen = module._describe, []

    def counted(path, *args):
        seen.append(Path(path).resolve())
        return describe(path, *args)

    monkeypatch.setattr(module, "_describe", counted)
    return seen


def test_check_inputs_gives_the_checked_paths_and_the_probe(clips, tmp_path, probed):
    out = tmp_path / "a" / "b" / "out.mp4"
    inputs = check_inputs(clips["video"], clips["audio"], out, media.MediaCaps())
    assert inputs == Inputs(video=clips["video"], audio=clips["audio"], output=out,
                            info=video.probe(clips["video"]), audio_seconds=inputs.audio_seconds)
    assert inputs.audio_seconds == pytest.approx(1.0, abs=0.05)  # the container's own duration
    assert probed.count(clips["video"].resolve()) == 2  # check_inputs' own probe, and the one above
    assert not (tmp_path / "a").exists(), "checking creates nothing"


def test_check_inputs_applies_the_caps(clips, tmp_path):
    info = video.probe(clips["video"])
    with pytest.raises(InputError, match=rf"{info.width}x{info.height}; the limit is 32 pixels"):
        check_inputs(clips["video"], clips["audio"], tmp_path / "o.mp4", media.MediaCaps(max_side=32))
    with pytest.raises(InputError, match="the limit is 0.5 s"):
        check_inputs(clips["video"], clips["audio"], tmp_path / "o.mp4",
                     media.MediaCaps(max_duration=0.5))


def test_the_caps_are_applied_before_any_weight_is_looked_at(env, clips, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv(media.ENV_MAX_SIDE, "32")
    status, err = run_cli(capsys, clips["video"], clips["audio"], "-o", tmp_path / "o.mp4", *NO_WEIGHTS)
    assert status == 2 and "the limit is 32 pixels" in one_line(err) and media.ENV_MAX_SIDE in one_line(err)


@pytest.mark.parametrize("problem", ["missing", "empty", "folder"])
def test_preflight_and_load_audio_refuse_an_unusable_audio_file_alike(clips, tmp_path, problem):
    path = tmp_path / "voice.wav"
    if problem == "empty":
        path.write_bytes(b"")
    elif problem == "folder":
        path.mkdir()
    with pytest.raises(InputError) as checked:
        check_inputs(clips["video"], path, tmp_path / "o.mp4", media.MediaCaps())
    with pytest.raises(InputError) as loaded:
        audio.load_audio(path)
    assert str(checked.value) == str(loaded.value) and str(path) in str(loaded.value)


@pytest.mark.slow
def test_a_cli_run_probes_the_video_once(env, weights, clips, tmp_path, capsys, probed):  # noqa: F811
    folder, cfg = weights
    status, err = run_cli(capsys, clips["video"], clips["audio"], "-o", tmp_path / "o.mp4",
                          "--weights-dir", folder, "--unet-config", cfg, "--device", "cpu", "--inference-steps", "2",
                          "-q")
    assert status == 0, err
    assert probed.count(clips["video"].resolve()) == 1, probed
