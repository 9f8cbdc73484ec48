"""The Ray batch runner on CPU: tiny weights, tiny clips, one local Ray of 2 CPUs for the whole module."""
from __future__ import annotations

import json
import logging
import os
import re
import signal

import numpy as np
import pytest

from latentsync import InputError
from latentsync.batch.command import main
from latentsync.batch.jobs import WORK_SUFFIX, read_jobs
from latentsync.options import parse_ranges
from latentsync.timeline import FADE_FRAMES, range_frames, touched_chunks
from latentsync.video.check import is_complete
from media_utils import decode_video, face_clip, probe_streams, speech
from test_ranges import plain_reencode
from tiny_weights import tiny_weights_with_manifest

ray = pytest.importorskip("ray")

FAST = {"inference_steps": 2, "loop_mode": "cut_off"}


@pytest.fixture(scope="module")
def cluster():
    # One local Ray for the module (it takes seconds to start); batch.main joins it instead of starting its own.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights_with_manifest(tmp_path_factory)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"clip25": face_clip(d / "clip25.mp4", 25), "speech_1s": speech(d / "speech1.wav", 1.0),
            "clip40": face_clip(d / "clip40.mp4", 40), "speech_16": speech(d / "speech16.wav", 1.6)}


@pytest.fixture
def batch(cluster, weights, monkeypatch, tmp_path):
    """Run ``python -m latentsync.batch`` in this process on the tiny weights; returns (status, result lines)."""
    folder, cfg, manifest = weights
    monkeypatch.setenv("LATENTSYNC_MANIFEST", str(manifest))  # the entry point reads it, as the CLI does

    def run(jobs: list[dict], *flags: str, on_dispatch=None, quiet: bool = True) -> tuple[int, list[dict]]:
        jobs_file, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
        jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        status = main([str(jobs_file), "--results", str(results), "--weights-dir", str(folder), "--unet-config",
                       str(cfg), "--syncnet-config", str(folder / "syncnet.yaml"), "--device", "cpu",
                       *(["-q"] if quiet else []), *flags], on_dispatch=on_dispatch)
        return status, [json.loads(line) for line in results.read_text().splitlines()]

    return run


def test_a_bad_job_fails_alone_and_a_rerun_skips_the_finished_ones(batch, media, tmp_path):
    jobs = [{"video": str(media["clip25"]), "audio": str(media["speech_1s"]), "output": str(tmp_path / f"{i}.mp4"),
             "seed": i, **FAST} for i in range(3)]
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all\n")
    jobs.insert(2, {"video": str(media["clip25"]), "audio": str(notes), "output": str(tmp_path / "bad.mp4"), **FAST})

    status, lines = batch(jobs, "--workers", "2")
    assert status == 1
    by_line = {r["line"]: r for r in lines}
    assert len(lines) == 4 and [by_line[n]["status"] for n in (1, 2, 3, 4)] == ["succeeded"] * 2 + ["failed",
                                                                                                     "succeeded"]
    bad = by_line[3]
    assert bad["output"] == str(tmp_path / "bad.mp4") and "notes.wav" in bad["error"] and "\n" not in bad["error"]
    for n, seed in ((1, 0), (2, 1), (4, 2)):
        r = by_line[n]
        assert r["seed"] == seed and r["frames"] == 25 and r["seconds"] > 0 and r["error"] is None
        assert r["sync"] is not None and is_complete(tmp_path / f"{seed}.mp4")
    assert not (tmp_path / "bad.mp4").exists()
    assert not list(tmp_path.glob(f".*{WORK_SUFFIX}")), "a job's work folder was left behind"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("[0-9].mp4")}

    status, lines = batch(jobs, "--workers", "2")
    assert status == 1
    assert sorted((r["line"], r["status"]) for r in lines) == [(1, "skipped"), (2, "skipped"), (3, "failed"),
                                                               (4, "skipped")]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a finished output was rendered again"


def test_segments_rendered_on_two_workers_equal_a_single_process_run(batch, media, tmp_path):
    common = {"video": str(media["clip40"]), "audio": str(media["speech_16"]), "seed": 11, **FAST}
    whole, parts = tmp_path / "whole.mp4", tmp_path / "parts.mp4"
    status, lines = batch([{**common, "output": str(whole)}, {**common, "output": str(parts), "segments": 3}],
                          "--workers", "2")
    assert status == 0 and [r["status"] for r in lines] == ["succeeded"] * 2
    a, b = _blocks(decode_video(whole)), _blocks(decode_video(parts))
    assert len(a) == len(b) == 40  # 3 chunks of 16, 16 and 8 frames, one per segment
    # The frames before encoding are identical; x264 codes each part as its own stream, so pixels differ by its
    # rounding (1.9 levels on average here). On 8×8 block means that is 0.7 levels, another seed's mouth 2.6.
    diff = np.abs(a - b).mean(axis=(1, 2, 3))
    assert diff.max() <= 1.0, f"joined segments differ from the single run by up to {diff.max():.2f} grey levels"
    audio = [s for s in probe_streams(parts)["streams"] if s["codec_type"] == "audio"]
    assert len(audio) == 1 and abs(float(audio[0]["duration"]) - 40 / 25) < 0.05, "the user's audio, muxed once"
    assert {r["seed"] for r in lines} == {11} and lines[0]["frames"] == lines[1]["frames"] == 40
    assert not list(tmp_path.glob(f".*{WORK_SUFFIX}")), "segment parts were left behind"


def test_a_range_across_two_segments_renders_as_in_a_single_process_run(batch, media, tmp_path):
    # Output frames 10 … 21 of 40, with their fades 4 … 27: chunks 0 and 1 are edited, chunk 2 passes through. The
    # split gives each segment one edited chunk, [0] and [1, 2] (an even split, [0, 1] and [2], would leave the
    # second worker nothing to generate), so the range and its fades cross the segments' boundary.
    common = {"video": str(media["clip40"]), "audio": str(media["speech_16"]), "seed": 11, "ranges": "0.4-0.88",
              **FAST}
    spans = range_frames(parse_ranges(common["ranges"]), 25.0, 40)
    edited = touched_chunks(spans, 16, 40)
    assert spans == [(10, 22)] and edited == [0, 1]
    renders = []
    whole, parts = tmp_path / "whole.mp4", tmp_path / "parts.mp4"
    status, lines = batch([{**common, "output": str(whole)}, {**common, "output": str(parts), "segments": 2}],
                          "--workers", "2", on_dispatch=lambda task, pid: task.kind == "render" and renders.append(
                              task.args[1]))
    assert sorted(renders, key=lambda r: r.start) == [range(0, 1), range(1, 3)]
    assert all(any(c in chunks for c in edited) for chunks in renders)
    assert status == 0 and [r["status"] for r in lines] == ["succeeded"] * 2
    assert [r["ranges"] for r in lines] == [[[0.4, 0.88]]] * 2
    assert {r["seed"] for r in lines} == {11} and lines[0]["frames"] == lines[1]["frames"] == 40
    a, b = _blocks(decode_video(whole)), _blocks(decode_video(parts))
    diff = np.abs(a - b).mean(axis=(1, 2, 3))  # as for whole videos: the same frames, up to x264's rounding
    assert len(a) == len(b) == 40 and diff.max() <= 1.0, f"joined ranged segments differ by {diff.max():.2f}"
    outside = [j for j in range(40) if not any(first - FADE_FRAMES <= j < stop + FADE_FRAMES for first, stop in spans)]
    assert outside == [*range(0, 4), *range(28, 40)]
    shown, plain = plain_reencode(media["clip40"], "bounce", 40, tmp_path)
    for output, blocks in ((whole, a), (parts, b)):
        frames = decode_video(output).astype(np.int16)[outside]
        err, err_plain = np.abs(frames - shown[outside]).mean(), np.abs(plain[outside] - shown[outside]).mean()
        assert err <= 1.1 * err_plain + 0.1, (output.name, err, err_plain)  # the encoder's rounding only
        # x264 codes the edited frames and the parts as streams of their own, so outside the ranges its rounding
        # differs from the plain re-encode's by 1.4 to 1.9 grey levels per pixel, 0.35 to 0.75 on 8×8 blocks (a
        # frame with 1/7 of the lip-synced face: 1.0 to 1.2).
        diff = np.abs(blocks[outside] - _blocks(plain)[outside]).mean(axis=(1, 2, 3))
        assert diff.max() <= 1.0, f"outside the ranges {output.name} differs from a plain re-encode by {diff.max():.2f}"
    assert not list(tmp_path.glob(f".*{WORK_SUFFIX}")), "segment parts were left behind"


def test_an_output_that_is_another_jobs_input_fails_before_ray_and_the_good_jobs_run(batch, media, tmp_path):
    video = tmp_path / "talk.mp4"
    video.write_bytes(media["clip25"].read_bytes())
    original = video.read_bytes()
    (tmp_path / "taken").write_text("a file where a folder should be\n")
    common = {"audio": str(media["speech_1s"]), **FAST}
    jobs = [{**common, "video": str(video), "output": str(tmp_path / "good.mp4")},
            {**common, "video": str(media["clip25"]), "output": str(tmp_path / "." / "talk.mp4")},
            {**common, "video": str(media["clip25"]), "output": str(tmp_path / "taken" / "o.mp4")},
            {**common, "video": str(media["clip25"]), "output": str(tmp_path / "folder") + "/"}]
    status, lines = batch(jobs)
    assert status == 1
    by_line = {r["line"]: r for r in lines}
    assert len(lines) == 4 and by_line[1]["status"] == "succeeded" and is_complete(tmp_path / "good.mp4")
    assert "is also the video of line 1" in by_line[2]["error"]
    assert by_line[3]["error"] == f"cannot create the output folder {tmp_path / 'taken'}: {tmp_path / 'taken'} is a " \
                                  "file, not a folder"
    assert "names a folder (it ends with a slash)" in by_line[4]["error"]
    assert video.read_bytes() == original, "a job's output overwrote another job's input"


def test_workers_that_cannot_load_the_models_give_every_job_its_line(batch, media, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    jobs = [{"video": str(media["clip25"]), "audio": str(media["speech_1s"]), "output": str(tmp_path / f"{i}.mp4"),
             **FAST} for i in range(2)]
    status, lines = batch(jobs, "--weights-dir", str(empty))
    assert status in (1, 2)
    assert sorted(r["line"] for r in lines) == [1, 2] and {r["status"] for r in lines} == {"failed"}
    assert len({r["error"] for r in lines}) == 1 and "no-weights" in lines[0]["error"]


def _blocks(frames: np.ndarray, k: int = 8) -> np.ndarray:
    """Means of k×k pixel blocks: what the encoder's rounding leaves alone while a different mouth still shows."""
    n, h, w, c = frames.shape
    return frames[:, : h // k * k, : w // k * k].reshape(n, h // k, k, w // k, k, c).mean(axis=(2, 4))


def test_the_driver_logs_each_jobs_progress_under_its_line(batch, media, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    common = {"video": str(media["clip25"]), "audio": str(media["speech_1s"]), "seed": 5, **FAST}
    jobs = [{**common, "output": str(tmp_path / "whole.mp4")},
            {**common, "output": str(tmp_path / "parts.mp4"), "segments": 2}]
    status, _ = batch(jobs, "--workers", "2", quiet=False)
    assert status == 0
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "latentsync.batch.driver")
    for line in ("line 1: faces started (25 frames)", "line 1: synthesis started (25 frames)",
                 "line 2: faces started (25 frames)", "line 2: part 2: synthesis started (9 frames)"):
        assert line in text.splitlines(), text
    assert re.search(r"^line 1: faces \d+ % \(\d+/25 frames\), ETA \d+:\d\d$", text, re.M), text


def test_a_killed_worker_loses_only_its_task_which_is_retried(batch, media, tmp_path):
    killed = []

    def kill(task, pid):  # SIGKILL the worker right after it is handed a whole job, and again for a segment
        if task.kind in ("run", "render") and task.kind not in killed:
            killed.append(task.kind)
            os.kill(pid, signal.SIGKILL)

    common = {"video": str(media["clip25"]), "audio": str(media["speech_1s"]), "seed": 5, **FAST}
    jobs = [{**common, "output": str(tmp_path / "whole.mp4")},
            {**common, "output": str(tmp_path / "parts.mp4"), "segments": 2}]
    status, lines = batch(jobs, "--workers", "2", on_dispatch=kill)
    assert killed == ["run", "render"]
    assert status == 0 and [r["status"] for r in lines] == ["succeeded"] * 2
    assert is_complete(tmp_path / "whole.mp4") and is_complete(tmp_path / "parts.mp4")
    assert not list(tmp_path.glob(f".*{WORK_SUFFIX}")), "a killed task's files were left behind"


def test_a_cut_off_mp4_is_not_complete(media, tmp_path):
    from latentsync import video as video_mod

    out = video_mod.mux_audio(media["clip25"], media["speech_1s"], tmp_path / "whole.mp4", duration=1.0)
    assert is_complete(out)
    cut = tmp_path / "cut.mp4"
    data = out.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    assert not is_complete(cut)
    assert not is_complete(tmp_path / "missing.mp4")


def test_a_job_line_takes_the_sampler_and_guidance_until(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.mp4", "a.wav"):
        (tmp_path / name).write_bytes(b"x")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"video": "a.mp4", "audio": "a.wav", "output": "o.mp4", "sampler": "unipc", '
                    '"guidance_until": 0.5}\n{"video": "a.mp4", "audio": "a.wav", "output": "p.mp4", '
                    '"sampler": "euler"}\n')
    good, bad = read_jobs(jobs)
    assert [(j.options.sampler, j.options.steps, j.options.guided_steps) for j in good] == [("unipc", 10, 5)]
    assert [r["line"] for r in bad] == [2] and "sampler must be one of ddim, dpmpp_2m, unipc" in bad[0]["error"]


def test_bad_lines_fail_with_one_line_messages_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.mp4", "a.wav"):  # the inputs exist: the checks before Ray look at paths, not at media
        (tmp_path / name).write_bytes(b"x")
    jobs = tmp_path / "jobs.jsonl"
    lines = ['{"video": "a.mp4", "audio": "a.wav", "output": "o1.mp4", "guidance_scale": 9}',
             'not json',
             '{"video": "a.mp4", "output": "o2.mp4"}',
             '{"video": "a.mp4", "audio": "a.wav", "output": "o3.mp4", "colour": "red"}',
             '{"video": "a.mp4", "audio": "a.wav", "output": "o3.mp4"}',
             '{"video": "a.mp4", "audio": "a.wav", "output": "o4.mp4", "segments": 0}',
             '{"video": "a.mp4", "audio": "a.wav", "output": "o5.mp4", "seed": 3, "segments": 2}']
    jobs.write_text("\n".join(lines) + "\n")
    good, bad = read_jobs(jobs)
    errors = {r["line"]: r["error"] for r in bad}
    assert "guidance_scale" in errors[1] and "not JSON" in errors[2] and "'audio'" in errors[3]
    assert "unknown option 'colour'" in errors[4] and "segments" in errors[6]
    assert [(j.line, j.options.seed, j.segments) for j in good] == [(5, good[0].options.seed, 1), (7, 3, 2)]
    assert good[0].options.seed is not None, "every job gets a concrete seed, reported in its result"
    (tmp_path / "dup.jsonl").write_text(lines[4] + "\n" + lines[4] + "\n")
    _, [dup] = read_jobs(tmp_path / "dup.jsonl")
    assert "also the output of line 1" in dup["error"]
    with pytest.raises(InputError, match="does not exist"):
        read_jobs(tmp_path / "nothing.jsonl")


def test_a_signal_stops_a_wait_on_workers_that_are_still_loading_at_once(cluster):
    import time

    from latentsync.batch.cluster import get

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    def load() -> None:  # a worker still loading its models
        time.sleep(20)

    loading = ray.remote(num_cpus=0)(load).remote()
    previous = signal.signal(signal.SIGALRM, stop)
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # SIGTERM would come the same way: to the driver's main thread
        with pytest.raises(Stopped):
            get([loading])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ray.cancel(loading, force=True)
    assert time.monotonic() - started < 3, "the signal waited for the workers to load"
