"""``cut_off`` and ``silence`` stream face pass 1 too: the first chunk is rendered while the pass is still running,
and the output is the one a plan made after the whole pass gives, frame for frame.

Their output's length is the video's (the shorter, or the longer, of video and audio), known only once pass 1 ends
or (``cut_off``) reaches the audio's length; a chunk goes ahead when no length still possible changes it. For
``silence`` that takes a whole 30 s Whisper window the padding cannot change, so those clips run at 4 fps
(``keep_fps``): half a minute in a hundred-odd frames.
"""
from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

from latentsync import audio as audio_mod
from latentsync import plan as plan_mod
from latentsync import video as video_mod
from latentsync.length import _clean_windows, _padded_windows, _span_prefix, scored_spans
from latentsync.options import RunOptions
from latentsync.pipeline import LipSync
from latentsync.timeline import Edits, pad_with_silence, range_frames
from latentsync.tracking import FaceTrack
from media_utils import decode_audio, decode_video, face_clip, speech
from tiny_weights import make_tiny_weights

FAST = {"inference_steps": 2, "guidance_scale": 1.5, "seed": 7}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder, cfg = make_tiny_weights(tmp_path_factory.mktemp("weights"))
    return LipSync.from_pretrained(folder, unet_config=cfg, syncnet_config=folder / "syncnet.yaml", device="cpu")


def _quiet_tail(path, seconds: float, loud: float):
    """Speech of ``seconds`` whose part after ``loud`` s is quieter: its loudest moment lies in the first window."""
    raw = decode_audio(speech(path.with_suffix(".raw.wav"), seconds)).copy()
    raw[int(loud * 16000):] *= 0.4
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(raw, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "clip4s": face_clip(d / "clip4s.mp4", 100),
        "speech36": speech(d / "speech36.wav", 3.6),
        "speech3": speech(d / "speech3.wav", 3.0),
        "slow34s": face_clip(d / "slow34s.mp4", 136, fps=4),  # 34 s at 4 fps
        # 12 s at 4 fps: longer than what the first chunk waits for (16 frames, a fade and the face's persistence)
        "slow12s": face_clip(d / "slow12s.mp4", 48, fps=4),
        "speech31": _quiet_tail(d / "speech31.wav", 31.0, 30.0),
    }


# name: video, audio, options[, the container's frame count told instead]; each streams its first chunk
# before pass 1 ends
CASES = {
    "cut_off, video longer": ("clip4s", "speech36", {"loop_mode": "cut_off"}),
    "silence, video shorter": ("slow12s", "speech31", {"loop_mode": "silence", "keep_fps": True}),
    "cut_off, ranges": ("clip4s", "speech36", {"loop_mode": "cut_off", "ranges": "0.5-1.5,3.3-9"}),
    # The video is the longer (the audio padded with silence), and the container's count is only an estimate:
    # padded features made for it are made again for the real length.
    "silence, video longer than it says": ("slow34s", "speech3", {"loop_mode": "silence", "keep_fps": True}, 20),
}


@pytest.fixture(scope="module")
def runs(pipe, media, tmp_path_factory):
    """Per case: the streamed run (``lipsync``) and a plan made after the whole pass, rendered and finished; each
    with its output frames before encoding; and what the track had done when the first frame was written."""
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for k, (name, (video, audio, options, *estimate)) in enumerate(CASES.items()):
        opts = RunOptions(**options, **FAST)
        tracks: list[FaceTrack] = []

        class Recording(FaceTrack):  # records each track made, to look at it mid-run
            made = tracks

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.made.append(self)

        first: list[tuple[int, bool]] = []
        streamed: dict[int, np.ndarray] = {}

        def tap(j, frame, seen=streamed, first=first, tracks=tracks):
            if not seen:  # serial: no chunk after this one has been asked of the track yet
                first.append((len(tracks[-1].matrices), tracks[-1].ended))
            seen.setdefault(j, frame.copy())

        mp = pytest.MonkeyPatch()
        if estimate:
            mp.setattr(video_mod, "expected_frames", lambda info, fps=None, frames=estimate[0]: frames)
        mp.setattr(plan_mod, "FaceTrack", Recording)
        mp.setattr(pipe, "serial", True)
        mp.setattr(pipe, "frame_tap", tap)
        try:
            result = pipe.lipsync(media[video], media[audio], d / f"{k}-streamed.mp4", options=opts)
            whole: dict[int, np.ndarray] = {}
            mp.setattr(pipe, "frame_tap", lambda j, frame, whole=whole: whole.setdefault(j, frame.copy()))
            plan = pipe.plan(media[video], media[audio], opts)
            part = pipe.render(plan, d / f"{k}-part.mp4")
            reference = pipe.finish(plan, [part], d / f"{k}-whole.mp4")
        finally:
            mp.undo()
        out[name] = {"result": result, "reference": reference, "plan": plan, "first": first[0],
                     "streamed": streamed, "whole": whole, "files": (d / f"{k}-streamed.mp4", d / f"{k}-whole.mp4")}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_first_chunk_is_rendered_before_pass_1_ends(runs, name):
    run = runs[name]
    tracked, ended = run["first"]
    assert not ended, f"{name}: pass 1 had ended when the first frame was written"
    assert tracked < len(run["plan"].matrices)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_streamed_output_is_the_plan_made_after_the_pass(runs, name):
    run = runs[name]
    result, reference, plan = run["result"], run["reference"], run["plan"]
    assert sorted(run["streamed"]) == sorted(run["whole"]) == list(range(plan.num_out))
    for j in range(plan.num_out):  # before encoding: bit for bit
        assert np.array_equal(run["streamed"][j], run["whole"][j]), f"{name}: output frame {j} differs"
    assert (result.frames, result.frames_with_face, result.ranges) == (reference.frames, reference.frames_with_face,
                                                                       reference.ranges)
    assert result.sync == reference.sync
    streamed_file, whole_file = run["files"]
    assert np.array_equal(decode_video(streamed_file), decode_video(whole_file))
    assert np.array_equal(decode_audio(streamed_file), decode_audio(whole_file))


@pytest.mark.slow
def test_the_stages_running_concurrently_give_the_same_frames(pipe, media, runs, tmp_path):
    """The padded features reach the generation while it runs on its own thread: the frames do not change."""
    run = runs["silence, video longer than it says"]
    seen: dict[int, np.ndarray] = {}
    pipe.frame_tap = lambda j, frame: seen.setdefault(j, frame.copy())
    try:
        pipe.lipsync(media["slow34s"], media["speech3"], tmp_path / "concurrent.mp4", loop_mode="silence",
                     keep_fps=True, **FAST)
    finally:
        pipe.frame_tap = None
    assert sorted(seen) == sorted(run["whole"])
    assert all(np.array_equal(seen[j], run["whole"][j]) for j in seen)


@pytest.mark.slow
def test_the_cases_cover_both_lengths_and_the_padding(runs):
    frames = {name: (len(run["plan"].matrices), run["plan"].num_out) for name, run in runs.items()}
    assert frames["cut_off, video longer"] == (92, 92)  # the pass stops at the audio's 92 frames
    assert frames["silence, video longer than it says"] == (136, 136)  # the audio padded with silence
    assert frames["silence, video shorter"][1] > frames["silence, video shorter"][0] == 48  # the video bounces
    assert runs["silence, video longer than it says"]["plan"].features.shape[0] > 150  # the padded audio's
    assert runs["cut_off, ranges"]["result"].ranges


# --- what a chunk may go ahead on, against every length it could end at ----------------------------------------------

@pytest.mark.parametrize("ranges", [(), ((0.5, 1.5), (3.3, 9.0)), ((0.0, 30.0),),
                                    ((2.0, 6.0), (7.0, 7.5), (8.0, 40.0))])
def test_the_span_prefix_is_every_longer_outputs(ranges):
    fps = 25.0
    for shortest in [10, 64, 65, 80, 100, 190, 300, 777]:
        prefix, bound = _span_prefix(Edits.of(ranges, fps, 16), shortest)
        for n in range(shortest, shortest + 1500):
            scored = scored_spans(range_frames(ranges, fps, n) if ranges else [(0, n)])
            assert scored[:len(prefix)] == prefix, (ranges, shortest, n)
            assert all(a >= bound for a, _ in scored[len(prefix):]), (ranges, shortest, n)


def test_windows_the_silence_pad_leaves_alike(tmp_path):
    """The log-mel windows counted alike are alike, bit for bit, with every pad tried (the features are the
    encoder's of each window alone); an audio loudest at its very end has none before the pass ends."""
    fps, window = 25.0, audio_mod.N_FRAMES
    wav = decode_audio(_quiet_tail(tmp_path / "a.wav", 31.0, 30.0)).copy()
    own = audio_mod.log_mel(wav)
    frames = audio_mod.audio_frame_count(own.new_empty((own.shape[1] // 2, 0, 0)), fps)
    clean = _clean_windows(wav, own, frames, fps)
    assert clean == 1
    for n in [frames + 1, frames + 2, frames + 3, frames + 60, frames + 800]:
        padded = audio_mod.log_mel(pad_with_silence(wav, n, fps))
        assert torch.equal(padded[:, :clean * window], own[:, :clean * window])
    loud_end = wav.copy()
    loud_end[-800:] = 0.99  # the loudest bin, which scales every window, is one the pad changes
    loud_mel = audio_mod.log_mel(loud_end)
    assert _clean_windows(loud_end, loud_mel, frames, fps) == 0
    assert not torch.equal(audio_mod.log_mel(pad_with_silence(loud_end, frames + 60, fps))[:, :window],
                           loud_mel[:, :window])
    short = wav[:3 * 16000]  # past its end, once the pass has 31 s: the pad's first window, whatever follows
    assert _padded_windows(len(short), 700, fps) == 0 and _padded_windows(len(short), 800, fps) == 1
    first = audio_mod.log_mel(pad_with_silence(short, 800, fps))[:, :window]
    for n in [801, 830, 1500]:
        assert torch.equal(audio_mod.log_mel(pad_with_silence(short, n, fps))[:, :window], first)
