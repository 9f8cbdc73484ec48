"""StableSyncNet: parity with upstream, strict loading, sync scoring and active-speaker selection."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from latentsync import InputError
from latentsync.audio import wav2lip_mel
from latentsync.config import config_path, load_config
from latentsync.models.syncnet import StableSyncNet
from latentsync.syncscore import ScoreFn, SyncScore, SyncScorer, choose_active_speaker
from latentsync.weights import load_syncnet

SR = 16000


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def tiny_config(parity_dir) -> dict:
    return json.loads((parity_dir / "syncnet_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_weights(parity_dir):
    return parity_dir / "syncnet_state_dict.safetensors"


@pytest.fixture(scope="module")
def tiny_net(tiny_config, tiny_weights) -> StableSyncNet:
    return load_syncnet(tiny_config, tiny_weights)


# --- the network -------------------------------------------------------------------------------------------------


def test_parity_with_upstream_on_every_case(parity_dir, tiny_net):
    cases = load_file(str(parity_dir / "syncnet_cases.safetensors"))
    frames = cases["frames_u8"].float() / 127.5 - 1.0
    with torch.no_grad():
        vision, audio = tiny_net(frames, cases["audio_mel"])
    cosine = (vision * audio).sum(1)
    for i in range(len(frames)):
        assert _max_rel(vision[i], cases["vision_embeds"][i]) <= 1e-4, f"vision case {i}"
        assert _max_rel(audio[i], cases["audio_embeds"][i]) <= 1e-4, f"audio case {i}"
        assert abs(cosine[i] - cases["cosine"][i]) <= 1e-4 * abs(cases["cosine"][i]), f"cosine case {i}"


def test_embeddings_are_unit_vectors(tiny_net):
    torch.manual_seed(0)
    vis_c = tiny_net.config.visual_encoder.in_channels
    with torch.no_grad():
        v, a = tiny_net(torch.rand(2, vis_c, 128, 256) * 2 - 1, torch.randn(2, 1, 80, 52))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))


def test_full_size_state_dict_matches_official_manifest(reference_dir):
    rows = [line.split("\t") for line in (reference_dir / "stable_syncnet_keys.tsv").read_text().splitlines() if line]
    cfg = load_config(config_path("syncnet/syncnet_16_pixel_attn.yaml"))["model"]
    with torch.device("meta"):
        net = StableSyncNet.from_config(cfg)
    ours = [(k, str(tuple(v.shape))) for k, v in net.state_dict().items()]
    assert ours == [(k, shape) for k, shape in rows]


# --- strict loading ----------------------------------------------------------------------------------------------


def test_pt_round_trip_in_upstream_format(tmp_path, tiny_config, tiny_weights, tiny_net):
    sd = load_file(str(tiny_weights))
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "stable_syncnet.pt")
    torch.save(sd, tmp_path / "bare.pt")
    (tmp_path / "syncnet.yaml").write_text(yaml.safe_dump({"model": tiny_config, "data": {"num_frames": 16}}))

    x = torch.rand(1, tiny_config["visual_encoder"]["in_channels"], 128, 256) * 2 - 1
    m = torch.randn(1, 1, 80, 52)
    with torch.no_grad():
        want = tiny_net(x, m)
        for cfg, ckpt in [(tiny_config, "stable_syncnet.pt"), (tmp_path / "syncnet.yaml", "bare.pt")]:
            net = load_syncnet(cfg, tmp_path / ckpt)
            assert not net.training
            got = net(x, m)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_in_requested_dtype(tiny_config, tiny_weights):
    net = load_syncnet(tiny_config, tiny_weights, dtype=torch.float64)
    assert {p.dtype for p in net.parameters()} == {torch.float64}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("visual_encoder.norm_out.weight"), "missing keys: 1 (visual_encoder.norm_out.weight)"),
        (
            lambda sd: sd.__setitem__("visual_encoder.extra", torch.zeros(1)),
            "unexpected keys: 1 (visual_encoder.extra)",
        ),
        (
            lambda sd: sd.__setitem__("audio_encoder.conv_in.bias", torch.zeros(3)),
            "mis-shaped keys: 1 (audio_encoder.conv_in.bias (3,)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_strict_loading_rejects_a_damaged_checkpoint(tmp_path, tiny_config, tiny_weights, damage, message):
    sd = load_file(str(tiny_weights))
    damage(sd)
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"SyncNet checkpoint .*bad\.pt") as err:
        load_syncnet(tiny_config, tmp_path / "bad.pt")
    assert message in str(err.value)


def test_checkpoint_of_another_config_is_rejected(tiny_weights):
    with pytest.raises(InputError, match="mis-shaped keys"):
        load_syncnet(config_path("syncnet/syncnet_16_pixel_attn.yaml"), tiny_weights)


def test_missing_checkpoint_is_an_input_error(tmp_path, tiny_config):
    with pytest.raises(InputError, match="not found"):
        load_syncnet(tiny_config, tmp_path / "nope.pt")


# --- scoring with the real (tiny) network ------------------------------------------------------------------------


def _random_clip(n_frames: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (n_frames, size, size, 3), dtype=np.uint8)
    wav = (0.1 * rng.standard_normal(int(SR * n_frames / 25))).astype(np.float32)
    return crops, wav


def _by_hand(net: StableSyncNet, crops: np.ndarray, wav: np.ndarray, start: int, audio_frame: int) -> float:
    """One window exactly as upstream's training code builds it: f×(3, 128, 256) lower halves → (f·3) channels."""
    frames = torch.from_numpy(crops[start : start + 16]).permute(0, 3, 1, 2)[:, :, 128:, :]  # (16, 3, 128, 256)
    x = frames.reshape(1, 48, 128, 256).float() / 127.5 - 1
    mel_start = int(80.0 * (audio_frame / 25.0))
    mel = torch.from_numpy(wav2lip_mel(wav)[:, mel_start : mel_start + 52]).float()[None, None]
    with torch.no_grad():
        v, a = net(x, mel)
    return float((v * a).sum())


def test_scorer_matches_windows_built_by_hand(tiny_net):
    crops, wav = _random_clip(40)
    score = SyncScorer(tiny_net, max_offset=2, stride=8)(crops, wav)
    starts = [2, 10, 18]  # offsets ±2 fit from frame 2; 16-frame windows end by frame 40
    assert score.windows == len(starts)
    assert score.offsets == (-2, -1, 0, 1, 2)
    for offset, got in zip(score.offsets, score.mean_cosines, strict=True):
        want = np.mean([_by_hand(tiny_net, crops, wav, s, s + offset) for s in starts])
        assert abs(got - want) < 1e-5, offset
    assert score.offset0_cosine == score.mean_cosines[2]


def test_score_fields_are_finite_and_consistent(tiny_net):
    crops, wav = _random_clip(60, seed=1)
    score = SyncScorer(tiny_net)(crops, wav)
    assert isinstance(score, SyncScore)
    assert score.offsets == tuple(range(-5, 6))
    assert np.all(np.isfinite(score.mean_cosines)) and np.isfinite(score.offset0_cosine)
    assert -5 <= score.best_offset <= 5
    assert score.mean_cosines[score.offsets.index(score.best_offset)] == max(score.mean_cosines)
    assert score.confidence == pytest.approx(max(score.mean_cosines) - np.median(score.mean_cosines))
    assert score.confidence >= 0
    assert score.windows == len(range(5, 60 - 16 - 5 + 1, 8))


def test_512_crops_are_scored_as_their_256_resize(tiny_net):
    crops, wav = _random_clip(24, size=512, seed=2)
    crops = np.repeat(np.repeat(crops[:, ::2, ::2], 2, axis=1), 2, axis=2)  # 2×2 blocks: the 256 resize is exact
    small = np.ascontiguousarray(crops[:, ::2, ::2])
    scorer = SyncScorer(tiny_net, max_offset=1)
    assert scorer(crops, wav).mean_cosines == pytest.approx(scorer(small, wav).mean_cosines, abs=1e-5)


def test_other_frame_rates_are_resampled_by_timestamp(tiny_net):
    crops, wav = _random_clip(50, seed=3)
    doubled = np.repeat(crops, 2, axis=0)  # the same clip at 50 fps
    at25 = SyncScorer(tiny_net, max_offset=1)(crops, wav)
    at50 = SyncScorer(tiny_net, max_offset=1, fps=50.0)(doubled, wav)
    assert at50.mean_cosines == pytest.approx(at25.mean_cosines, abs=1e-6)


def test_short_clip_is_scored_with_silence_padding(tiny_net):
    crops, wav = _random_clip(16, seed=4)
    score = SyncScorer(tiny_net, max_offset=5)(crops, wav)
    assert score.windows == 1 and np.all(np.isfinite(score.mean_cosines))


def test_too_short_clip_is_refused(tiny_net):
    crops, wav = _random_clip(15)
    with pytest.raises(ValueError, match="at least 16"):
        SyncScorer(tiny_net)(crops, wav)


# --- active speaker ----------------------------------------------------------------------------------------------

MOUTH = (slice(160, 224), slice(80, 176))  # lower-face region of a 256 aligned crop


class MouthEnergyScorer:
    """Stand-in SyncNet: correlation of per-frame mouth-pixel spread with per-frame audio RMS, per offset."""

    def __init__(self, max_offset: int = 3):
        self.max_offset = max_offset
        self.calls = 0

    def __call__(self, crops: np.ndarray, wav: np.ndarray) -> SyncScore:
        self.calls += 1
        mouth = crops[:, MOUTH[0], MOUTH[1]].reshape(len(crops), -1).astype(np.float64).std(axis=1)
        rms = np.sqrt((wav[: len(crops) * 640].astype(np.float64).reshape(len(crops), 640) ** 2).mean(axis=1))
        k = self.max_offset
        offsets = tuple(range(-k, k + 1))
        t = np.arange(k, len(crops) - k)
        corr = [float(np.corrcoef(mouth[t], rms[t + o])[0, 1]) for o in offsets]
        best = int(np.argmax(corr))
        return SyncScore(corr[k], offsets[best], corr[best] - float(np.median(corr)), len(t), offsets, tuple(corr))


def _talking_faces(n: int = 100, seed: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(speaker crops, other face's crops, wav): the speaker's mouth opens with the syllables of the audio; the other
    face's mouth moves just as much but to an unrelated rhythm."""
    rng = np.random.default_rng(seed)
    speech = np.repeat(rng.random(n // 4) < 0.5, 4)[:n]  # syllables of 4 frames (160 ms)
    other = np.repeat(rng.random(n // 4) < 0.5, 4)[:n]
    wav = (rng.standard_normal(n * 640) * np.repeat(0.02 + 0.3 * speech, 640)).astype(np.float32)

    def face(open_mouth: np.ndarray) -> np.ndarray:
        crops = np.full((n, 256, 256, 3), 128, np.uint8)
        crops += rng.integers(0, 8, crops.shape, dtype=np.uint8)  # sensor noise
        for i in np.flatnonzero(open_mouth):
            crops[i, MOUTH[0], MOUTH[1]] = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        return crops

    return face(speech), face(other), wav


def test_the_face_whose_mouth_follows_the_audio_is_chosen(caplog):
    speaker, other, wav = _talking_faces()
    scorer: ScoreFn = MouthEnergyScorer()
    with caplog.at_level(logging.INFO, logger="latentsync.syncscore"):
        assert choose_active_speaker([speaker, other], wav, scorer) == 0
    assert "active speaker: face 0 of 2" in caplog.text
    assert choose_active_speaker([other, speaker], wav, scorer) == 1


def test_a_single_face_is_chosen_without_scoring():
    speaker, _, wav = _talking_faces(n=20)
    scorer = MouthEnergyScorer()
    assert choose_active_speaker([speaker], wav, scorer) == 0
    assert scorer.calls == 0


def test_tracks_of_different_lengths_are_refused():
    speaker, other, wav = _talking_faces(n=40)
    with pytest.raises(ValueError, match="same frames"):
        choose_active_speaker([speaker, other[:-1]], wav, MouthEnergyScorer())


def test_real_scorer_plugs_into_selection(tiny_net):
    a, wav = _random_clip(32, seed=6)
    b, _ = _random_clip(32, seed=7)
    scorer = SyncScorer(tiny_net, max_offset=2, stride=16)
    score_a, score_b = scorer(a, wav), scorer(b, wav)
    assert score_a.confidence != score_b.confidence  # a real preference, not a tie broken by position
    expected = 0 if (score_a.confidence, score_a.offset0_cosine) > (score_b.confidence, score_b.offset0_cosine) else 1
    assert choose_active_speaker([a, b], wav, scorer) == expected
    assert choose_active_speaker([b, a], wav, scorer) == 1 - expected  # follows the face, not the slot
