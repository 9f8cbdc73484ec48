"""Editing only chosen time ranges: parsing, the frames inside (the whole run's, bit for bit) and outside (the
source's), the fades at the edges, the random stream, the sync spans, and the cost (Whisper where needed)."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from latentsync import InputError
from latentsync import video as video_mod
from latentsync.control import StageClock
from latentsync.face import FaceLandmarker
from latentsync.facepool import FacePool
from latentsync.options import RunOptions, parse_ranges
from latentsync.pipeline import LipSync
from latentsync.plan import _features
from latentsync.timeline import (
    FADE_FRAMES,
    Edits,
    chunk_at,
    edit_weights,
    face_share,
    range_frames,
    source_index,
    touched_chunks,
)
from latentsync.tracking import PERSIST_FRAMES, FaceTrack
from media_utils import decode_video, face_clip, speech
from tiny_weights import make_tiny_weights

FAST = {"inference_steps": 2, "guidance_scale": 1.5, "seed": 5}
RANGE = "2-2.6"  # output frames 50 … 64 of 100: chunks 2 to 4 with the fades, chunks 0, 1, 5, 6 pass through


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder, cfg = make_tiny_weights(tmp_path_factory.mktemp("weights"))
    return LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"clip": face_clip(d / "clip100.mp4", 100), "speech": speech(d / "speech4.wav", 4.0)}


@pytest.fixture(scope="module")
def runs(pipe, media, tmp_path_factory):
    """The whole run and the ranged run of the same seed: each output frame before encoding, and the results."""
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for name, ranges in [("whole", ""), ("ranged", RANGE)]:
        seen: dict[int, np.ndarray] = {}
        pipe.frame_tap = lambda j, frame, seen=seen: seen.setdefault(j, frame.copy())
        try:
            result = pipe.lipsync(media["clip"], media["speech"], d / f"{name}.mp4", ranges=ranges, **FAST)
        finally:
            pipe.frame_tap = None
        out[name] = (result, np.stack([seen[j] for j in range(len(seen))]))
    return out


# --- the option ------------------------------------------------------------------------------------------------------

def test_ranges_parse_seconds_and_clock_times_sorted_and_merged():
    assert parse_ranges("40-42.2, 12.5-18,1:00-1:02.5,0:00:17-00:00:19") == ((12.5, 19.0), (40.0, 42.2),
                                                                             (60.0, 62.5))
    assert parse_ranges([(1, 2), (1.5, 3), [5, 6]]) == ((1.0, 3.0), (5.0, 6.0))
    assert parse_ranges("") == parse_ranges(None) == RunOptions().ranges == ()
    assert RunOptions.make({"ranges": "1-2"}, seed=1).ranges == ((1.0, 2.0),)  # dicts: the batch jobs' way


@pytest.mark.parametrize("text, named", [("18-12.5", "18-12.5"), ("3-3", "3-3"), ("12.5", "'12.5'"),
                                         ("1-2,x-4", "'x-4'"), ("1-2,,3-4", "empty range"),
                                         ("1:75-2:00", "'1:75-2:00'"), ("1-nan", "'1-nan'"),
                                         ("1.5:30-2:00", "'1.5:30' is not a time")])
def test_an_unparsable_or_empty_range_is_refused_naming_it(text, named):
    with pytest.raises(InputError, match="range") as info:
        RunOptions(ranges=text)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_the_cli_takes_ranges_and_checks_them_before_any_weights(tmp_path, capsys):
    from latentsync.cli import build_parser, main

    assert build_parser().parse_args(["v.mp4", "a.wav", "-o", "o.mp4", "--ranges", "1:02-1:04.5"]).ranges == \
        "1:02-1:04.5"
    assert main([str(tmp_path / "v.mp4"), str(tmp_path / "a.wav"), "-o", str(tmp_path / "o.mp4"),
                 "--ranges", "4-2"]) == 2
    assert "error: range 4-2 is empty or negative" in capsys.readouterr().err


@pytest.mark.parametrize("ranges, said", [("2.001-2.02", "range 2.001-2.02 holds no frame: at 25 fps"),
                                          ("0-1e-9", "range 0-1e-09 holds no frame"),
                                          ("1e12-1e13", "ranges 1e+12-1e+13 lie past the end of the output")])
def test_a_range_that_edits_no_frame_is_one_line_before_any_weights(media, tmp_path, capsys, ranges, said):
    from latentsync.cli import main

    status = main([str(media["clip"]), str(media["speech"]), "-o", str(tmp_path / "o.mp4"), "--ranges", ranges,
                   "--weights-dir", str(tmp_path / "no-weights"), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and said in err and err.count("\n") == 1 and "weights" not in err


@pytest.mark.parametrize("ranges, said", [("2.001-2.02", "holds no frame"), ("1e12-1e13", "lie past the end")])
def test_the_api_refuses_a_range_that_edits_no_frame_in_one_line(pipe, media, tmp_path, ranges, said):
    with pytest.raises(InputError, match=said):
        pipe.lipsync(media["clip"], media["speech"], tmp_path / "o.mp4", ranges=ranges, **FAST)
    with pytest.raises(InputError, match=said):
        pipe.plan(media["clip"], media["speech"], RunOptions(ranges=ranges, **FAST))
    assert not (tmp_path / "o.mp4").exists()


def test_a_range_where_no_frame_shows_the_face_is_named_in_a_warning(pipe, tmp_path, media, caplog):
    clip = face_clip(tmp_path / "hidden.mp4", 100, hide=range(40, 80))
    with caplog.at_level(logging.WARNING):
        plan = pipe.plan(clip, media["speech"], RunOptions(ranges="0.4-0.8,2-2.6", **FAST))
        pipe.lipsync(clip, media["speech"], tmp_path / "o.mp4", ranges="0.4-0.8,2-2.6", **FAST)
    assert plan.faceless_ranges() == [(2.0, 2.6)]
    warned = [r.getMessage() for r in caplog.records if "shows no face" in r.getMessage()]
    assert warned == ["range 2.00-2.60 s shows no face: nothing is edited there"] * 2  # the plan's, the run's


def test_a_batch_job_carries_ranges(tmp_path):
    from latentsync.batch.jobs import read_jobs

    for name in ("v.mp4", "a.wav"):
        (tmp_path / name).write_bytes(b"x")
    jobs_file = tmp_path / "jobs.jsonl"
    lines = [{"video": str(tmp_path / "v.mp4"), "audio": str(tmp_path / "a.wav"), "output": str(tmp_path / "o.mp4"),
              "ranges": "0:05-0:07,1-2"},
             {"video": str(tmp_path / "v.mp4"), "audio": str(tmp_path / "a.wav"), "output": str(tmp_path / "p.mp4"),
              "ranges": "7-5"}]
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines))
    jobs, failed = read_jobs(jobs_file)
    assert jobs[0].options.ranges == ((1.0, 2.0), (5.0, 7.0))
    assert len(failed) == 1 and "range 7-5" in failed[0]["error"]


def test_frames_weights_and_touched_chunks():
    assert range_frames(((2.0, 2.6), (3.9, 9.0)), 25.0, 100) == [(50, 65), (98, 100)]
    w = edit_weights([(50, 65)], 100)
    assert (w[50:65] == 1).all() and (w[:50 - FADE_FRAMES] == 0).all() and (w[65 + FADE_FRAMES:] == 0).all()
    ramp = w[50 - FADE_FRAMES:50]
    assert (np.diff(ramp) > 0).all() and 0 < ramp[0] < ramp[-1] < 1
    assert touched_chunks([(50, 65)], 16, 100) == [2, 3, 4]


def test_the_face_fades_in_and_out_where_it_appears_and_leaves():
    has_face = [False] * 10 + [True] * 20 + [False] * 10
    share = [face_share(has_face, s) for s in range(40)]
    ramp = share[10:10 + FADE_FRAMES]
    assert share[:10] == [0] * 10 and share[30:] == [0] * 10
    assert (np.diff(ramp) > 0).all() and 0 < ramp[0] and ramp[-1] < 1 and share[10 + FADE_FRAMES] == 1
    assert share[24:30] == ramp[::-1]
    whole = [True] * 40  # the video's own first and last frames are no place where the face appears
    assert chunk_at(0, 16, 40, "bounce", whole).weight == () and chunk_at(2, 16, 40, "bounce", whole).weight == ()


def test_a_chunks_weights_need_the_faces_only_a_fade_ahead():
    rng = np.random.default_rng(0)
    has_face = rng.random(200) < 0.8
    blend = edit_weights([(40, 120)], 240)
    for index in range(200 // 16 - 1):
        stop = (index + 1) * 16 + FADE_FRAMES
        whole, ahead = chunk_at(index, 16, 240, "bounce", has_face), chunk_at(index, 16, 240, "bounce", has_face[:stop])
        assert whole == ahead
        assert chunk_at(index, 16, 240, "bounce", has_face, blend) == chunk_at(index, 16, 240, "bounce",
                                                                               has_face[:stop], blend)
    with_blend = chunk_at(3, 16, 240, "bounce", has_face, blend)
    assert all(w == blend[48 + k] * face_share(has_face, 48 + k) for k, w in enumerate(with_blend.weight)
               if has_face[48 + k])


# --- the frames ------------------------------------------------------------------------------------------------------

def test_inside_the_ranges_the_whole_runs_frames_outside_the_source(runs, media):
    a, b = runs["whole"][1], runs["ranged"][1]
    assert a.shape == b.shape and len(a) == 102  # the audio's length: the last two frames bounce back
    inside, faded = range(50, 65), set(range(50 - FADE_FRAMES, 65 + FADE_FRAMES))
    for j in inside:  # bit for bit before encoding: chunks 0 and 1 were skipped, yet their draws were taken
        assert np.array_equal(a[j], b[j]), f"output frame {j} differs from the whole run's"
    source = list(video_mod.read_frames(media["clip"], 25.0))
    for j in range(102):
        if j not in faded:
            assert np.array_equal(b[j], source[source_index(j, 100, "bounce")]), f"output frame {j} is not its source"
    assert not np.array_equal(a[10], b[10])  # the whole run did edit there


def test_outside_the_ranges_the_file_is_a_plain_reencode(runs, media, tmp_path):
    """Decoded, the frames outside the ranges are as close to the source as a run that changes nothing: the source
    frames written by the same encoder."""
    shown, plain = plain_reencode(media["clip"], "bounce", 102, tmp_path)
    ranged = decode_video(runs["ranged"][0].output).astype(np.int16)
    outside = [j for j in range(102) if not 50 - FADE_FRAMES <= j < 65 + FADE_FRAMES]
    err_ranged = np.abs(ranged[outside] - shown[outside]).mean()
    err_plain = np.abs(plain[outside] - shown[outside]).mean()
    assert err_ranged <= 1.1 * err_plain + 0.1, (err_ranged, err_plain)  # the encoder's rounding only
    assert np.abs(ranged[outside] - plain[outside]).mean() <= 1.5


def plain_reencode(clip, order: str, frames: int, folder) -> tuple[np.ndarray, np.ndarray]:
    """What a run that changes nothing shows in ``frames`` output frames (``clip``'s frames looped in ``order``), and
    those frames written by the same encoder and decoded again (both int16)."""
    source = list(video_mod.read_frames(clip, 25.0))
    shown = np.stack([source[source_index(j, len(source), order)] for j in range(frames)])
    with video_mod.VideoWriter(folder / "plain.mp4", 25.0, shown.shape[2], shown.shape[1]) as writer:
        for frame in shown:
            writer.write(frame)
    return shown.astype(np.int16), decode_video(folder / "plain.mp4").astype(np.int16)


def _face_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns where two runs' frames differ anywhere: the pasted face."""
    rows, cols = np.nonzero(np.abs(a.astype(np.int16) - b).sum(axis=(0, 3)))
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def test_no_pop_at_the_edges(runs, media):
    whole, ranged = runs["whole"][1], runs["ranged"][1]
    rows, cols = _face_box(whole, ranged)
    frames = ranged[:, rows, cols].astype(np.int16)
    change = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # change[j]: frame j → j + 1, on the face
    ordinary = change[50:64].max()  # neighbouring frames inside the range
    edges = np.r_[change[50 - FADE_FRAMES - 1:50], change[64:65 + FADE_FRAMES]]
    assert edges.max() <= ordinary, (edges, ordinary)
    # Without the fade, the range's first frame would follow its source frame: a jump well above the ordinary.
    source = list(video_mod.read_frames(media["clip"], 25.0))
    assert np.abs(whole[50, rows, cols].astype(np.int16) - source[49][rows, cols]).mean() > 2 * ordinary


def test_sync_score_and_metrics_cover_the_ranges(runs):
    whole, ranged = runs["whole"][0], runs["ranged"][0]
    assert whole.ranges == () and ranged.ranges == ((2.0, 2.6),)
    assert ranged.frames == whole.frames == 102
    assert ranged.frames_with_face == 15 and whole.frames_with_face == 102
    assert ranged.sync is None  # 15 frames: shorter than SyncNet's 16-frame window; the whole run's 100 are scored
    assert whole.sync is not None


def test_ranges_covering_the_whole_video_give_its_very_bytes(pipe, media, runs, tmp_path):
    out = tmp_path / "all.mp4"
    result = pipe.lipsync(media["clip"], media["speech"], out, ranges="0-0:10", **FAST)
    assert result.ranges == ()
    assert out.read_bytes() == runs["whole"][0].output.read_bytes()


def test_parts_of_a_ranged_plan_join_to_its_whole_render(pipe, media, tmp_path):
    plan = pipe.plan(media["clip"], media["speech"], RunOptions(ranges="1.2-1.5", **FAST))
    assert [c for c in range(plan.num_chunks) if plan.edited(c)] == [1, 2]
    seen: dict[str, dict[int, np.ndarray]] = {"whole": {}, "parts": {}}
    run = "whole"
    pipe.frame_tap = lambda j, frame: seen[run].setdefault(j, frame.copy())
    try:
        pipe.render(plan, tmp_path / "whole.mp4")
        run = "parts"
        for k, chunks in enumerate([range(0, 2), range(2, 5), range(5, 7)]):
            pipe.render(plan, tmp_path / f"part{k}.mp4", chunks)
    finally:
        pipe.frame_tap = None
    assert sorted(seen["parts"]) == sorted(seen["whole"]) == list(range(102))
    assert all(np.array_equal(seen["parts"][j], seen["whole"][j]) for j in range(102))


def test_segments_share_the_edited_chunks():
    from latentsync.batch.driver import split_chunks

    assert split_chunks(10, 3) == [range(0, 3), range(3, 7), range(7, 10)]  # no ranges: as before
    assert split_chunks(94, 3, list(range(46, 56))) == [range(0, 49), range(49, 53), range(53, 94)]
    assert split_chunks(94, 4, [3]) == [range(0, 94)]


def test_a_range_past_the_end_is_cut_with_a_warning_and_one_wholly_past_it_refused(pipe, media, caplog):
    with caplog.at_level(logging.WARNING):
        plan = pipe.plan(media["clip"], media["speech"], RunOptions(ranges="3.5-9,20-30", **FAST))
    assert plan.ranges == ((3.52, 4.08),)  # frames 88 … 101: those starting in the range and plan.num_out == 102
    assert "range 3.5-9 runs past the end" in caplog.text and "range 20-30" in caplog.text
    with pytest.raises(InputError, match=r"ranges 20-30 lie past the end of the output \(4.08 s\)"):
        pipe.plan(media["clip"], media["speech"], RunOptions(ranges="20-30", **FAST))


# --- the cost --------------------------------------------------------------------------------------------------------

def test_whisper_encodes_only_the_windows_the_ranges_read(pipe):
    encoder = pipe.models.audio_encoder
    mel = torch.rand(80, 7400) * 2 - 1  # three 30 s windows, the last one short
    calls = []
    real = encoder.features_from_log_mel
    whole = real(mel)
    counting = {"num_states": encoder.num_states, "hidden_size": encoder.hidden_size,
                "features_from_log_mel": lambda self, m: calls.append(m.shape[1]) or real(m)}
    encoder_calls = type("Counting", (), counting)()
    part = _features(encoder_calls, mel, [(1600, 1800)])  # feature rows: mel frames / 2
    assert calls == [3000]  # the middle window only
    assert torch.equal(part[1500:3000], whole[1500:3000]) and not part[:1500].any()


class _Counting:
    """A landmarker that counts the frames it is asked about."""

    def __init__(self, real: FaceLandmarker):
        self.real, self.calls = real, 0

    def detect(self, frame):
        self.calls += 1
        return self.real.detect(frame)


def _track(clip, horizon, **kw):
    with FaceTrack.open(clip, 25.0, video_mod.probe(clip), None, None, 64, clock=StageClock(), horizon=horizon,
                   **kw) as track:
        track.ensure(math.inf)
    return track.arrays()


def test_the_face_pass_detects_only_up_to_the_last_edited_chunk(media, tmp_path):
    window = Edits.of(((0.2, 0.6),), 25.0, 16).face_window  # frames 5 … 14 and their fades: chunks 0 and 1
    assert window == (0, 32) and Edits.of((), 25.0, 16) is None  # no ranges: the whole video, every frame tracked
    horizon = window[1]
    late = face_clip(tmp_path / "late.mp4", 40, hide=range(0, 20))  # the face shows only after the horizon
    real = FaceLandmarker()
    pool = FacePool(2)
    try:
        counting = _Counting(real)
        whole, has_whole = _track(media["clip"], None, landmarker=counting)
        assert counting.calls == 100
        counting.calls = 0
        part, has_part = _track(media["clip"], horizon, landmarker=counting)
        ahead = horizon + PERSIST_FRAMES + FADE_FRAMES  # the frames that decide the faces up to the horizon
        assert counting.calls == ahead  # about a third of the frames: the rest are only counted
        pooled, has_pooled = _track(media["clip"], horizon, pool=pool)
        late_whole, late_has = _track(late, None, landmarker=real)
        late_part, late_has_part = _track(late, 16, pool=pool)
    finally:
        pool.close()
        real.close()
    assert len(part) == len(pooled) == 100 and has_whole.all()
    assert np.array_equal(part[:horizon], whole[:horizon]) and np.array_equal(pooled[:horizon], whole[:horizon])
    assert not has_part[ahead:].any() and np.isnan(part[ahead:]).all()
    assert np.array_equal(has_part, has_pooled) and np.array_equal(part[has_part], pooled[has_pooled])
    # No face before the horizon: detection goes on, so the face is found and followed as in a whole run.
    assert late_has[20:].all() and np.array_equal(late_has, late_has_part)
    assert np.array_equal(late_whole[late_has], late_part[late_has_part])


def test_a_ranged_plan_detects_faces_only_where_needed(pipe, media, monkeypatch):
    calls = []
    real = FaceLandmarker.detect
    monkeypatch.setattr(FaceLandmarker, "detect", lambda self, frame: calls.append(1) or real(self, frame))
    monkeypatch.setattr(pipe, "face_workers", 0)  # detection here, where it is counted
    whole = pipe.plan(media["clip"], media["speech"], RunOptions(**FAST))
    assert len(calls) == 100
    calls.clear()
    ranged = pipe.plan(media["clip"], media["speech"], RunOptions(ranges="0.2-0.6", **FAST))
    assert len(calls) == 32 + PERSIST_FRAMES + FADE_FRAMES and len(ranged.has_face) == len(whole.has_face) == 100
    assert np.array_equal(ranged.matrices[:32], whole.matrices[:32]) and ranged.frames_with_face == 10
