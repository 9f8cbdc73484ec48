"""End-to-end lip-sync on CPU with tiny random checkpoints written in the upstream formats."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from latentsync import InputError
from latentsync.pipeline import LipSync
from latentsync.timeline import nearest_with_face, source_index
from media_utils import decode_audio, decode_video, face_clip, probe_streams, psnr, read_stamp, speech, write_clip
from tiny_weights import make_tiny_weights, manifest_for

FAST = {"inference_steps": 2, "guidance_scale": 1.5}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def cli_env(weights, tmp_path_factory):
    """Environment for the CLI on the tiny weights: a manifest describing them, so nothing is downloaded."""
    folder, _ = weights
    manifest = manifest_for(folder, tmp_path_factory.mktemp("manifest") / "weights.txt")
    return {**os.environ, "LATENTSYNC_MANIFEST": str(manifest),
            "LATENTSYNC_SYNCNET_CONFIG": str(folder / "syncnet.yaml")}


@pytest.fixture(scope="module")
def pipe(weights):
    folder, cfg = weights
    return LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "clip40": face_clip(d / "clip40.mp4", 40),
        "clip25": face_clip(d / "clip25.mp4", 25),
        "clip60": face_clip(d / "clip60.mp4", 60),
        "gap": face_clip(d / "gap.mp4", 60, hide=range(20, 40)),
        "speech_2s_stereo": speech(d / "speech2.m4a", 2.0, rate=44100, channels=2, codec=["-c:a", "aac"]),
        "speech_1s": speech(d / "speech1.wav", 1.0),
        "speech_16": speech(d / "speech16.wav", 1.6),
        "dir": d,
    }


def _video_stream(info: dict) -> dict:
    return next(s for s in info["streams"] if s["codec_type"] == "video")


def _audio_stream(info: dict) -> dict:
    return next(s for s in info["streams"] if s["codec_type"] == "audio")


def test_source_index_follows_upstream_ping_pong():
    assert [source_index(j, 3, "bounce") for j in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]
    assert [source_index(j, 3, "loop") for j in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_nearest_with_face_prefers_the_closest_frame():
    assert nearest_with_face([False, True, False, False, True, False]) == [1, 1, 1, 4, 4, 4]


def test_output_keeps_size_rate_and_the_users_audio(pipe, media, tmp_path):
    out = tmp_path / "out.mp4"
    result = pipe.lipsync(media["clip40"], media["speech_2s_stereo"], out, seed=1, **FAST)
    info = probe_streams(out)
    v, a = _video_stream(info), _audio_stream(info)
    assert (int(v["width"]), int(v["height"])) == (320, 240)
    assert int(v["nb_read_frames"]) == result.frames
    assert v["avg_frame_rate"] == "25/1"
    # 2.0 s of audio → upstream's count: floor(T/2) + 2 with T = 100 Whisper rows.
    assert result.frames == 52
    assert a["codec_name"] == "aac" and int(a["sample_rate"]) == 44100 and int(a["channels"]) == 2
    assert abs(float(a["duration"]) - result.frames / 25) < 0.05
    got, ref = decode_audio(out), decode_audio(media["speech_2s_stereo"])
    n = min(len(got), len(ref)) - 1600
    corr = np.corrcoef(got[:n], ref[:n])[0, 1]
    assert corr > 0.95, f"muxed audio does not match the input (r = {corr:.3f})"
    assert result.frames_with_face == result.frames
    assert set(result.seconds) >= {"faces", "audio", "vae_encode", "denoise", "vae_decode", "restore"}


def test_frames_outside_the_face_are_the_input(pipe, media, tmp_path):
    out = tmp_path / "out.mp4"
    result = pipe.lipsync(media["clip25"], media["speech_1s"], out, seed=2, loop_mode="cut_off", **FAST)
    got, src = decode_video(out), decode_video(media["clip25"])
    assert len(got) == result.frames == 25
    boxes = [pipe_face_box(pipe, f) for f in src]
    keep = np.ones(src.shape[:3], bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        keep[k, max(0, y1):y2, max(0, x1):x2] = False
    outside = psnr(got[keep], src[keep])
    inside = psnr(got[~keep], src[~keep])
    assert outside >= 35, f"PSNR outside the face rectangle {outside:.1f} dB"
    assert inside < outside, "the face region was not edited at all"


def pipe_face_box(pipe, frame, margin=3):
    """Bounding box of the warped crop rectangle of the tracked face: the only area restore may touch."""
    from latentsync.align import FaceAligner
    from latentsync.face import FaceTracker

    face = FaceTracker().track(frame)
    aligner = FaceAligner(pipe.models.resolution)
    _, m = aligner.align(frame, face.anchors)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    w, h = aligner.face_size
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ inv.T
    x1, y1 = np.floor(corners.min(0)).astype(int) - margin
    x2, y2 = np.ceil(corners.max(0)).astype(int) + margin
    return x1, y1, x2, y2


def test_frames_without_a_face_pass_through(pipe, media, tmp_path):
    out = tmp_path / "out.mp4"
    result = pipe.lipsync(media["gap"], media["speech_16"], out, seed=3, loop_mode="cut_off", **FAST)
    got, src = decode_video(out), decode_video(media["gap"])
    assert result.frames == 42
    assert result.frames_with_face == result.frames - 20
    for k in range(22, 38):  # well inside the covered second: untouched up to codec noise
        assert psnr(got[k], src[k]) > 38


@pytest.mark.parametrize("mode", ["bounce", "loop"])
def test_loop_modes_order_frames_like_upstream(pipe, media, tmp_path, mode):
    out = tmp_path / f"{mode}.mp4"
    result = pipe.lipsync(media["clip25"], media["speech_2s_stereo"], out, seed=4, loop_mode=mode, **FAST)
    order = [read_stamp(f) for f in decode_video(out)]
    assert order == [source_index(j, 25, mode) for j in range(result.frames)]
    assert result.frames == 52


def test_cut_off_keeps_the_shorter_and_cuts_the_audio(pipe, media, tmp_path):
    out = tmp_path / "cut.mp4"
    result = pipe.lipsync(media["clip25"], media["speech_2s_stereo"], out, seed=5, loop_mode="cut_off", **FAST)
    assert result.frames == 25
    assert [read_stamp(f) for f in decode_video(out)] == list(range(25))
    assert abs(float(_audio_stream(probe_streams(out))["duration"]) - 1.0) < 0.05


def test_silence_lip_syncs_the_rest_of_a_longer_video(pipe, media, tmp_path):
    out = tmp_path / "silence.mp4"
    result = pipe.lipsync(media["clip60"], media["speech_1s"], out, seed=6, loop_mode="silence", **FAST)
    assert result.frames == 60 == result.frames_with_face
    assert [read_stamp(f) for f in decode_video(out)] == list(range(60))
    audio = decode_audio(out)
    assert abs(len(audio) / 16000 - 60 / 25) < 0.05
    assert np.abs(audio[int(1.3 * 16000):]).max() < 1e-3, "the padding after the speech is not silent"


def test_same_seed_same_frames_other_seed_other_mouth(pipe, media, tmp_path):
    runs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        out = tmp_path / f"{name}.mp4"
        pipe.lipsync(media["clip25"], media["speech_1s"], out, seed=seed, loop_mode="cut_off", **FAST)
        runs[name] = decode_video(out).astype(np.int16)
    assert np.array_equal(runs["a"], runs["b"])
    assert np.abs(runs["a"] - runs["c"]).max() > 10


def test_a_multistep_sampler_with_late_guidance_lipsyncs_to_another_mouth(pipe, media, tmp_path):
    runs = {}
    for name, options in [("ddim", {}), ("dpmpp_2m", {"sampler": "dpmpp_2m", "guidance_until": 0.5})]:
        out = tmp_path / f"{name}.mp4"
        pipe.lipsync(media["clip25"], media["speech_1s"], out, seed=7, loop_mode="cut_off", **FAST, **options)
        runs[name] = decode_video(out).astype(np.int16)
    assert runs["ddim"].shape == runs["dpmpp_2m"].shape
    assert np.abs(runs["ddim"] - runs["dpmpp_2m"]).max() > 10


def test_each_run_steps_a_scheduler_of_its_own(pipe):
    """A multistep solver keeps its last outputs between steps: two runs at once must not step the same one."""
    from diffusers import DPMSolverMultistepScheduler

    from latentsync.control import StageClock
    from latentsync.options import RunOptions
    from latentsync.stages.generate import GenerateStage, _Features

    features = _Features(np.zeros((32, 1, 1), np.float32))
    a, b = (GenerateStage(features, 25.0, RunOptions(seed=1, sampler="dpmpp_2m"), pipe.models, StageClock())
            for _ in range(2))
    assert type(a.scheduler) is DPMSolverMultistepScheduler and a.scheduler is not b.scheduler


def test_names_with_spaces_quotes_and_shell_syntax(pipe, media, tmp_path):
    weird = tmp_path / "it's a \"clip\" $(touch pwned) `x`"
    weird.mkdir()
    video = weird / "my video $(touch pwned).mp4"
    audio = weird / "voice 'take 2'.wav"
    video.write_bytes(media["clip25"].read_bytes())
    audio.write_bytes(media["speech_1s"].read_bytes())
    out = weird / "out $(touch pwned).mp4"
    result = pipe.lipsync(video, audio, out, seed=9, loop_mode="cut_off", **FAST)
    assert out.is_file() and result.frames == 25
    assert not list(tmp_path.rglob("pwned")) and not (weird / "pwned").exists()


def test_video_without_a_face_is_an_input_error(pipe, media, tmp_path):
    blank = write_clip(tmp_path / "blank.mp4", [np.full((240, 320, 3), 40, np.uint8)] * 10)
    with pytest.raises(InputError, match="no face"):
        pipe.lipsync(blank, media["speech_1s"], tmp_path / "out.mp4", **FAST)


def test_text_file_as_audio_is_an_input_error(pipe, media, tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    with pytest.raises(InputError):
        pipe.lipsync(media["clip25"], text, tmp_path / "out.mp4", **FAST)


def test_bad_options_are_input_errors(pipe, media, tmp_path):
    with pytest.raises(InputError, match="loop_mode"):
        pipe.lipsync(media["clip25"], media["speech_1s"], tmp_path / "o.mp4", loop_mode="zigzag")
    with pytest.raises(InputError, match="guidance_scale"):
        pipe.lipsync(media["clip25"], media["speech_1s"], tmp_path / "o.mp4", guidance_scale=0.5)


def test_temporary_files_are_removed_also_on_failure(pipe, media, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    pipe.lipsync(media["clip25"], media["speech_1s"], tmp_path / "ok.mp4", loop_mode="cut_off", **FAST)
    with pytest.raises(InputError):
        pipe.lipsync(write_clip(tmp_path / "blank.mp4", [np.zeros((240, 320, 3), np.uint8)] * 5),
                     media["speech_1s"], tmp_path / "bad.mp4", **FAST)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cli_reports_bad_input_in_one_line(weights, media, tmp_path, cli_env):
    folder, cfg = weights
    proc = subprocess.run([sys.executable, "-m", "latentsync", str(tmp_path / "missing.mp4"), str(media["speech_1s"]),
                           "-o", str(tmp_path / "o.mp4"), "--weights-dir", str(folder), "--unet-config", str(cfg),
                           "--device", "cpu", "-q"], capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_cli_lipsyncs(weights, media, tmp_path, cli_env):
    folder, cfg = weights
    out = tmp_path / "cli.mp4"
    proc = subprocess.run([sys.executable, "-m", "latentsync", str(media["clip25"]), str(media["speech_1s"]),
                           "-o", str(out), "--weights-dir", str(folder), "--unet-config", str(cfg), "--device", "cpu",
                           "--inference-steps", "2", "--seed", "3", "--loop-mode", "cut_off"],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "seed 3" in proc.stdout and out.is_file()
    assert "sync:" in proc.stdout, "the CLI prints the sync score"
    assert "ETA" in proc.stderr or "it/s" in proc.stderr or "frame/s" in proc.stderr, "no progress bar on stderr"


def test_result_carries_a_sync_score(pipe, media, tmp_path):
    result = pipe.lipsync(media["clip40"], media["speech_16"], tmp_path / "o.mp4", seed=1, loop_mode="cut_off", **FAST)
    s = result.sync
    assert s is not None and s.windows >= 1
    assert -1 <= s.offset0_cosine <= 1 and s.best_offset in s.offsets and s.confidence >= 0


@pytest.fixture(scope="module")
def two_faces(media):
    """Two people side by side (the right one mirrored and darker), with the speech as the clip's own soundtrack."""
    from media_utils import face_frame, mux

    frames = []
    for i in range(40):
        left = face_frame(2 * np.sin(i / 6), 0)
        right = (face_frame(-2 * np.sin(i / 6), 1)[:, ::-1] * 0.7).astype(np.uint8)
        frames.append(np.concatenate([left, right], axis=1))
    d = media["dir"]
    silent = write_clip(d / "two_silent.mp4", frames)
    return {"silent": silent, "voiced": mux(silent, media["speech_16"], d / "two_voiced.mp4")}


def _edited_half(out, src) -> str:
    got, ref = decode_video(out), decode_video(src)
    w = ref.shape[2] // 2
    left, right = psnr(got[:, :, :w], ref[:, :, :w]), psnr(got[:, :, w:], ref[:, :, w:])
    assert max(left, right) > 38, "one person must stay untouched"
    return "left" if left < right else "right"


def test_active_speaker_edits_the_face_the_scorer_picks(pipe, media, two_faces, tmp_path, monkeypatch):
    import latentsync.syncscore as syncscore

    picked = {}

    def darkest(tracks, wav, scorer):  # a controllable stand-in for SyncNet's verdict: the darker (right) person
        picked["n"] = len(tracks)
        picked["wav"] = len(wav)
        return int(np.argmin([t.mean() for t in tracks]))

    monkeypatch.setattr(syncscore, "choose_active_speaker", darkest)
    out = tmp_path / "speaker.mp4"
    pipe.lipsync(two_faces["voiced"], media["speech_16"], out, face_select="active_speaker", loop_mode="cut_off",
                 seed=1, **FAST)
    assert picked["n"] == 2 and picked["wav"] > 16000
    assert _edited_half(out, two_faces["voiced"]) == "right"


def _faces_of_two_sizes(path, bigger: str):
    """Two people side by side, no soundtrack: one at full size, the other shrunk to 70 % on a grey background."""
    import cv2

    from media_utils import face_frame

    frames = []
    for i in range(40):
        big = face_frame(2 * np.sin(i / 6), 0)
        small = np.full_like(big, 110)
        h, w = big.shape[:2]
        shrunk = cv2.resize(face_frame(-2 * np.sin(i / 6), 1), (int(w * 0.7), int(h * 0.7)),
                            interpolation=cv2.INTER_AREA)
        top, left = (h - shrunk.shape[0]) // 2, (w - shrunk.shape[1]) // 2
        small[top:top + shrunk.shape[0], left:left + shrunk.shape[1]] = shrunk
        frames.append(np.concatenate([big, small] if bigger == "left" else [small, big], axis=1))
    return write_clip(path, frames)


@pytest.mark.parametrize("bigger", ["left", "right"])
def test_active_speaker_without_a_soundtrack_falls_back_to_the_largest_face(pipe, media, tmp_path, caplog, bigger):
    clip = _faces_of_two_sizes(tmp_path / f"two_sizes_{bigger}.mp4", bigger)
    out = tmp_path / "fallback.mp4"
    with caplog.at_level("WARNING"):
        pipe.lipsync(clip, media["speech_16"], out, face_select="active_speaker", loop_mode="cut_off", seed=1, **FAST)
    assert "no audio track" in caplog.text
    assert _edited_half(out, clip) == bigger


def test_keep_fps_processes_and_writes_at_the_source_rate(pipe, media, tmp_path):
    clip30 = face_clip(tmp_path / "clip30.mp4", 36, fps=30)
    kept = pipe.lipsync(clip30, media["speech_1s"], tmp_path / "kept.mp4", keep_fps=True, loop_mode="cut_off",
                        seed=1, **FAST)
    v = _video_stream(probe_streams(tmp_path / "kept.mp4"))
    assert v["avg_frame_rate"] == "30/1" and kept.fps == 30
    # 1 s of audio at 30 fps: every frame whose timestamp lies within the audio features (31 frames).
    assert kept.frames == int(v["nb_read_frames"]) == 31
    assert [read_stamp(f) for f in decode_video(tmp_path / "kept.mp4")] == list(range(31))
    default = pipe.lipsync(clip30, media["speech_1s"], tmp_path / "25.mp4", loop_mode="cut_off", seed=1, **FAST)
    assert default.fps == 25 and _video_stream(probe_streams(tmp_path / "25.mp4"))["avg_frame_rate"] == "25/1"
    assert default.frames == 27  # upstream's count for 1 s at 25 fps (the video has 30 frames at 25 fps)


def test_cancel_stops_the_run_and_leaves_nothing_behind(pipe, media, tmp_path, monkeypatch):
    import tempfile

    from latentsync.errors import Cancelled

    class AfterCalls:  # a cancel event that becomes set after a few checks (mid-way through the run)
        def __init__(self, n):
            self.n = n

        def is_set(self):
            self.n -= 1
            return self.n < 0

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "cancelled.mp4"
    with pytest.raises(Cancelled):
        pipe.lipsync(media["clip40"], media["speech_2s_stereo"], out, cancel=AfterCalls(6), **FAST)
    assert not out.exists() and list((tmp_path / "tmp").iterdir()) == []
    import psutil

    assert not [p.name() for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def test_rendered_chunk_ranges_join_to_the_whole_run(pipe, media, tmp_path, monkeypatch):
    import pickle

    from latentsync.options import RunOptions

    plan = pipe.plan(media["gap"], media["speech_2s_stereo"], RunOptions(seed=11, loop_mode="bounce", **FAST))
    plan = pickle.loads(pickle.dumps(plan))  # a plan travels to other workers
    assert plan.num_chunks == 4 and plan.options.seed == 11
    seen: dict[str, dict[int, np.ndarray]] = {"whole": {}, "parts": {}}
    run = "whole"
    monkeypatch.setattr(pipe, "frame_tap", lambda j, frame: seen[run].setdefault(j, frame.copy()))
    whole = pipe.render(plan, tmp_path / "whole.mp4")
    run = "parts"
    parts = [pipe.render(plan, tmp_path / "a.mp4", range(0, 2)), pipe.render(plan, tmp_path / "b.mp4", range(2, 4))]
    assert sorted(seen["parts"]) == sorted(seen["whole"]) == list(range(plan.num_out))
    for j in range(plan.num_out):  # before encoding: bit for bit
        assert np.array_equal(seen["parts"][j], seen["whole"][j]), f"output frame {j} differs"
    one = pipe.finish(plan, [whole], tmp_path / "one.mp4")
    joined = pipe.finish(plan, parts, tmp_path / "joined.mp4")
    a, b = (decode_video(tmp_path / name).astype(np.int16) for name in ("one.mp4", "joined.mp4"))
    assert a.shape == b.shape and len(a) == plan.num_out == joined.frames
    # Two x264 runs on different frame ranges round differently throughout (lookahead), so the codec's error is
    # the measure: the joined file is as close to the generated frames as the whole run's file is.
    ref = np.stack([seen["whole"][j] for j in range(plan.num_out)]).astype(np.int16)
    err_one, err_joined = np.abs(a - ref).mean(), np.abs(b - ref).mean()
    assert err_joined <= 1.1 * err_one + 0.1, (err_joined, err_one)
    assert np.abs(a - b).mean() <= 1.5
    assert joined.sync == one.sync and joined.seed == 11
    assert abs(float(_audio_stream(probe_streams(tmp_path / "joined.mp4"))["duration"]) - plan.num_out / 25) < 0.05


def test_the_deployments_caps_reach_the_pipeline(weights, media, tmp_path):
    from latentsync.media import MediaCaps

    folder, cfg = weights
    capped = LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu",
                                     caps=MediaCaps(max_side=200, max_duration=600.0))
    with pytest.raises(InputError, match="LATENTSYNC_MAX_SIDE"):
        capped.lipsync(media["clip25"], media["speech_1s"], tmp_path / "o.mp4", **FAST)
    assert not (tmp_path / "o.mp4").exists()
