"""Whole lip-syncs on a CUDA stand-in (tests/fake_cuda.py), through the entry points users call: the device left
out, every stage's device code, scoring while rendering, the warm-up at load, and what goes over the bus."""
from __future__ import annotations

import math
import threading
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentsync.align import FaceAligner, _blur_matrix, _gaussian_blur
from latentsync.devices import HIGH, LOW, MID, Staging
from latentsync.pipeline import LipSync
from latentsync.stages.generate import GenerateStage
from media_utils import decode_video, face_clip, speech
from tiny_weights import make_tiny_weights

SECONDS = 1.2  # two 16-frame chunks of output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-run")
    folder, cfg = make_tiny_weights(d / "weights")
    return {"folder": folder, "cfg": cfg, "video": face_clip(d / "clip.mp4", 40),
            "audio": speech(d / "speech.wav", SECONDS), "dir": d}


def _load(tiny, **kw) -> LipSync:
    folder = tiny["folder"]
    return LipSync.from_pretrained(folder, unet_config=tiny["cfg"], syncnet_config=folder / "syncnet.yaml",
                                   face_workers=0, **kw)


def _thread(name: str) -> str:
    return name.removeprefix("latentsync-").split("_")[0]


def test_a_whole_lipsync_with_the_device_left_out_runs_on_cuda(fake_cuda, tiny, tmp_path, monkeypatch):
    unet_calls = []
    real_call = GenerateStage.__call__
    monkeypatch.setattr(GenerateStage, "__call__", lambda self, work: (unet_calls.append(_thread(
        threading.current_thread().name)), real_call(self, work))[1])
    pipe = _load(tiny, device=None)  # as every Cog prediction, CLI and batch run without --device
    try:
        models = pipe.models
        assert models.device == torch.device("cuda", 0) == next(models.unet.parameters()).device
        assert models.dtype == torch.float16  # upstream's rule on sm_80+
        assert next(models.syncnet.parameters()).device == models.device  # 80 GB: SyncNet stays resident
        assert unet_calls == ["gpu", "gpu"]  # a whole chunk with and without guidance at load, on the GPU thread
        loaded = len(fake_cuda.seen.uploads), fake_cuda.seen.empty_cache
        fake_cuda.seen.kernels.clear()
        results, idents = [], []
        for run in range(2):
            results.append(pipe.lipsync(tiny["video"], tiny["audio"], tmp_path / f"out{run}.mp4",
                                        inference_steps=2, seed=3))
            idents.append({n: getattr(models.threads, n)._ident for n in ("align", "generate", "paste", "score")})
    finally:
        pipe.close()
    frames = results[0].frames
    for result in results:
        assert result.frames == frames and result.sync is not None
        assert decode_video(result.output).shape[0] == frames
    assert idents[0] == idents[1]  # the stages' threads live across runs (cuDNN plans per thread)
    assert fake_cuda.seen.empty_cache == loaded[1]  # SyncNet is resident: nothing is given back after a video
    seen = fake_cuda.seen
    # Every stage queued its kernels on its own thread's stream, at its priority.
    by_stream = {(_thread(t), fake_cuda.priority_of(SimpleStream(s))) for (t, _, s), n in seen.kernels.items()
                 if t.startswith("latentsync-")}
    assert by_stream == {("align", HIGH), ("gpu", MID), ("paste", HIGH), ("score", LOW)}
    assert ("score" in {t for t, _ in by_stream})  # scored while rendering, on the scoring thread
    # What goes up, per chunk and stage: a few pinned copies that do not block, no index list behind our back.
    render = seen.uploads[loaded[0]:]
    assert not [c for c in render if c.hidden]
    assert all(c.pinned and c.non_blocking for c in render), [c for c in render if not c.pinned]
    per_stage = Counter(_thread(c.thread) for c in render)
    chunks = 2 * math.ceil(frames / 16)  # two runs
    assert per_stage["align"] <= 2 * chunks  # frame windows with matrices; the aligned crops
    assert per_stage["gpu"] <= 2 * chunks + 2 * 3  # draws with audio windows; per run the noise and timesteps
    assert per_stage["paste"] <= 1 * chunks  # frame windows with matrices
    assert set(per_stage) <= {"align", "gpu", "paste", "score"}, [c for c in render if c.thread == "MainThread"]


class SimpleStream:
    """Just what FakeCuda.priority_of reads."""

    def __init__(self, stream_id: int):
        self.stream_id = stream_id


def test_the_cpu_warms_nothing_up_at_load(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(GenerateStage, "__call__", lambda self, work: calls.append(1))
    _load(tiny, device="cpu").close()
    assert calls == []


def test_staging_reuses_two_pinned_buffers_and_never_blocks(fake_cuda):
    staging = Staging(torch.device("cuda", 0))
    a, b = np.arange(12, dtype=np.uint8).reshape(4, 3), np.ones((2, 3), np.float32)
    for _ in range(4):
        up_a, up_b = staging.upload([a, b])
        assert up_a.device == up_b.device == torch.device("cuda", 0)
        assert torch.equal(up_a.cpu(), torch.from_numpy(a)) and torch.equal(up_b.cpu(), torch.from_numpy(b))
    uploads = [c for c in fake_cuda.seen.uploads if c.thread == threading.current_thread().name]
    assert len(uploads) == 4 and all(c.pinned and c.non_blocking for c in uploads)  # one copy per call
    assert len(staging._buffers) == 2  # made once, reused


def test_staging_on_the_cpu_hands_back_the_same_tensors():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (t,) = Staging(torch.device("cpu")).upload([a])
    assert torch.equal(t, torch.from_numpy(a)) and t.device.type == "cpu"


@pytest.mark.parametrize("size,h,w", [(3, 9, 11), (7, 40, 23), (41, 90, 120)])
def test_the_gpu_feather_blur_is_the_cpu_convolution(size, h, w):
    mask = torch.rand((1, 1, h, w), generator=torch.Generator().manual_seed(size))
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    by_matrix = _blur_matrix(kernel, h) @ mask @ _blur_matrix(kernel, w).T
    assert torch.allclose(by_matrix, _gaussian_blur(mask, size, sigma), atol=1e-5)


def test_pasting_on_cuda_runs_no_convolution(fake_cuda, monkeypatch):
    convs = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **kw: (convs.append(a[0].shape), real(*a, **kw))[1])
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (160, 200, 3), dtype=np.uint8) for _ in range(3)]
    aligner = FaceAligner(64)
    matrices = [aligner.matrix(np.array([[70, 60], [120, 60], [95, 90]]) + 3 * k) for k in range(3)]
    faces = torch.zeros((3, 3, 64, 64), device="cuda")
    cpu = aligner.restore_batch(frames, faces.cpu(), matrices)
    assert convs  # the CPU blurs by convolution
    convs.clear()
    on_gpu = aligner.restore_batch(frames, faces, matrices)
    assert convs == []  # no convolution, so no cuDNN plan per window shape
    for a, b in zip(cpu, on_gpu, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _tiny_syncnet(tiny):
    from latentsync.weights import load_syncnet

    return load_syncnet(tiny["folder"] / "syncnet.yaml", tiny["folder"] / "stable_syncnet.pt")


def test_syncnet_waits_in_one_pinned_buffer_and_goes_up_in_one_copy(fake_cuda, tiny):
    from latentsync.loader import place_syncnet
    from latentsync.syncscore import syncnet_on

    device = torch.device("cuda", 0)
    fake_cuda.free_memory = 2 * 2**30  # a small card: no room for SyncNet beside a 512-px run
    syncnet = place_syncnet(_tiny_syncnet(tiny), device, 512)
    state = syncnet.state_dict()
    (flat,) = syncnet.pinned_flat.values()  # one buffer (fp16), pinned once
    assert flat.is_pinned() and flat.numel() == sum(t.numel() for t in state.values())
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in state.values())
    x = torch.zeros((1, 48, 128, 256), dtype=torch.float16)
    on_cpu = syncnet.encode_visual(x)
    before, cache = len(fake_cuda.seen.uploads), fake_cuda.seen.empty_cache
    with syncnet_on(syncnet, device) as net:
        assert next(net.parameters()).device == device
        assert len(fake_cuda.seen.uploads) == before + 1  # the whole network in one copy
        assert torch.equal(net.encode_visual(x.to(device)).cpu(), on_cpu)
    assert fake_cuda.seen.empty_cache == cache + 1  # its room goes back to the U-Net
    assert next(syncnet.parameters()).device.type == "cpu"  # the pinned copy stays for the next video


def test_a_resident_syncnet_is_used_as_it_is(fake_cuda, tiny):
    from latentsync.loader import place_syncnet
    from latentsync.syncscore import syncnet_on

    device = torch.device("cuda", 0)
    syncnet = place_syncnet(_tiny_syncnet(tiny), device, 512)  # 79 GiB free
    cache = fake_cuda.seen.empty_cache
    with syncnet_on(syncnet, device) as net:
        assert net is syncnet
    assert fake_cuda.seen.empty_cache == cache
