"""Alignment and paste-back against upstream's AlignRestore (parity fixtures), plus device/window invariances."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentsync import InputError
from latentsync.align import FaceAligner, face_geometry, load_mask


@pytest.fixture(scope="module")
def cases(parity_dir):
    from safetensors.numpy import load_file

    meta = json.loads((parity_dir / "align_meta.json").read_text())
    return load_file(str(parity_dir / "align_cases.safetensors")), meta


def resolutions(meta) -> list[int]:
    return sorted(int(r) for r in meta["resolutions"])


def assert_images_close(ours: np.ndarray, ref: np.ndarray, what: str, region: np.ndarray | None = None) -> None:
    """The fixtures' tolerance (mean abs ≤ 1, p99 ≤ 3), then a stricter one on ``region`` (default: everywhere):
    the same arithmetic in float32 leaves only scattered ±1 truncation flips, so a wrong filter or kernel that
    the loose whole-frame figures would hide (the face is ~5 % of the frame) still fails."""
    assert ours.shape == ref.shape and ours.dtype == np.uint8, what
    err = np.abs(ours.astype(np.int16) - ref.astype(np.int16)).astype(np.float64)
    assert err.mean() <= 1.0 and np.percentile(err, 99) <= 3.0, (
        f"{what}: mean abs {err.mean():.4f}, p99 {np.percentile(err, 99)}")
    local = err if region is None else err[region]
    assert local.mean() <= 0.05 and local.max() <= 3, f"{what}: mean abs {local.mean():.4f}, max {local.max()}"


def test_geometry_follows_resolution():
    assert face_geometry(512)[0] == (420, 560)
    assert face_geometry(256)[0] == (210, 280)
    np.testing.assert_allclose(face_geometry(512)[1], [[95.2, 112], [324.8, 112], [210, 224]], atol=1e-9)


def test_matrices_match_upstream(cases):
    data, meta = cases
    for r in resolutions(meta):
        aligner = FaceAligner(r)
        ref = data[f"r{r}.matrices"]
        for i, anchors in enumerate(data["landmarks3"]):
            _, matrix = aligner.align(data["frame"], anchors)
            assert matrix.shape == (2, 3)
            err = np.abs(matrix - ref[i]).max()
            assert err <= 1e-3, f"R={r} frame {i}: matrix error {err}"


def test_aligned_faces_match_upstream(cases):
    data, meta = cases
    for r in resolutions(meta):
        aligner = FaceAligner(r)
        ref = data[f"r{r}.aligned"]
        assert tuple(meta["resolutions"][str(r)]["face_size_wh"]) == aligner.face_size
        for i, anchors in enumerate(data["landmarks3"]):
            face, _ = aligner.align(data["frame"], anchors)
            assert face.shape == (r, r, 3)
            if i < len(ref):
                assert_images_close(face, ref[i], f"R={r} aligned frame {i}")


def test_restore_matches_upstream(cases):
    data, meta = cases
    for r in resolutions(meta):
        aligner = FaceAligner(r)
        face = torch.from_numpy(data[f"r{r}.restore_face_in"])
        out = aligner.restore(data["frame"], face, data[f"r{r}.matrices"][0])
        ref = data[f"r{r}.restored_frame"]
        changed = (ref != data["frame"]).any(axis=-1)
        assert_images_close(out, ref, f"R={r} restored frame", region=changed)
        assert not np.array_equal(out, data["frame"])  # the negated lower half shows


def test_mask_matches_upstream(cases, reference_dir):
    import cv2

    data, meta = cases
    native = cv2.imread(str(reference_dir / "mask.png")).shape[0]
    for r in resolutions(meta):
        mask = load_mask(reference_dir / "mask.png", r)
        assert mask.shape == (1, r, r) and mask.dtype == torch.float32
        err = np.abs(mask.numpy() - data[f"r{r}.mask"][:1]).max()
        assert err == 0 if r == native else err <= 1e-3, f"R={r}: mask error {err}"


def test_missing_or_corrupt_mask_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        load_mask(tmp_path / "absent.png", 256)
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError):
        load_mask(bad, 256)


def test_reset_restarts_smoothing(cases):
    data, _ = cases
    anchors = data["landmarks3"]
    fresh = FaceAligner(256).matrix(anchors[3])
    aligner = FaceAligner(256)
    smoothed = [aligner.matrix(a) for a in anchors[:4]][-1]
    assert np.abs(smoothed - fresh).max() > 1e-3  # the previous frames pull the translation
    aligner.reset()
    np.testing.assert_array_equal(aligner.matrix(anchors[3]), fresh)


def embed(frame: np.ndarray, offset: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    big = np.zeros((*size, 3), np.uint8)
    big[offset[0]:offset[0] + frame.shape[0], offset[1]:offset[1] + frame.shape[1]] = frame
    return big


def test_large_frame_equals_small_frame(cases):
    """Only a window around the face is processed: a 1080p frame gives what the face's own frame gives."""
    data, meta = cases
    r = resolutions(meta)[0]
    oy, ox = 300, 700
    big = embed(data["frame"], (oy, ox), (1080, 1920))
    aligner_small, aligner_big = FaceAligner(r), FaceAligner(r)
    face_small, m_small = aligner_small.align(data["frame"], data["landmarks3"][0])
    face_big, m_big = aligner_big.align(big, data["landmarks3"][0] + (ox, oy))
    assert np.abs(face_small.astype(int) - face_big).max() <= 1
    generated = torch.from_numpy(data[f"r{r}.restore_face_in"])
    out_small = aligner_small.restore(data["frame"], generated, m_small)
    out_big = aligner_big.restore(big, generated, m_big)
    h, w = data["frame"].shape[:2]
    inner = out_big[oy:oy + h, ox:ox + w]
    assert np.abs(inner.astype(int) - out_small).max() <= 1
    outside = out_big.copy()
    outside[oy:oy + h, ox:ox + w] = 0
    assert not outside.any()  # nothing pasted beyond the face's surroundings


def test_crop_reaching_outside_the_frame_is_filled(cases):
    data, _ = cases
    aligner = FaceAligner(256)
    corner = data["frame"][:160, :160].copy()  # the face runs off the right and bottom edges
    anchors = data["landmarks3"][0] - (120, 20)
    face, matrix = aligner.align(corner, anchors)
    assert (face == 127).all(axis=-1).mean() > 0.1  # upstream's grey fill
    out = aligner.restore(corner, torch.zeros(3, 256, 256), matrix)
    assert out.shape == corner.shape


def test_tensor_frames_equal_numpy_frames(cases):
    data, meta = cases
    r = resolutions(meta)[-1]
    aligner = FaceAligner(r)
    face = torch.from_numpy(data[f"r{r}.restore_face_in"])
    matrix = data[f"r{r}.matrices"][0]
    ref = aligner.restore(data["frame"], face, matrix)
    out = aligner.restore(torch.from_numpy(data["frame"]), face, matrix)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), ref)
    aligned, _ = FaceAligner(r).align(data["frame"], data["landmarks3"][0])
    aligned_t, _ = FaceAligner(r).align(torch.from_numpy(data["frame"]), data["landmarks3"][0])
    np.testing.assert_array_equal(aligned_t, aligned)


def test_restore_torch_path_equals_opencv_path(cases, monkeypatch):
    """On the CPU the erosions use OpenCV; on other devices torch max-pools. Both give the same frame."""
    import latentsync.align as align

    data, meta = cases
    for r in resolutions(meta):
        aligner = FaceAligner(r)
        face = torch.from_numpy(data[f"r{r}.restore_face_in"])
        matrix = data[f"r{r}.matrices"][0]
        ref = aligner.restore(data["frame"], face, matrix)
        with monkeypatch.context() as m:
            m.setattr(align, "_erode", align._erode_torch)
            out = aligner.restore(data["frame"], face, matrix)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(cases):
    _cuda_equals_cpu(cases)


def test_the_cuda_path_equals_the_cpu_on_the_stand_in(fake_cuda, cases):
    """The CUDA code path (frames on the device, torch's erosion, the blur by matrix products) on tests/fake_cuda."""
    _cuda_equals_cpu(cases)


def _cuda_equals_cpu(cases) -> None:
    data, meta = cases
    r = resolutions(meta)[-1]
    cpu, gpu = FaceAligner(r), FaceAligner(r, device="cuda")
    face_c, m_c = cpu.align(data["frame"], data["landmarks3"][0])
    face_g, m_g = gpu.align(torch.from_numpy(data["frame"]).cuda(), data["landmarks3"][0])
    np.testing.assert_array_equal(m_c, m_g)
    assert np.abs(face_c.astype(int) - face_g).max() <= 1
    generated = torch.from_numpy(data[f"r{r}.restore_face_in"])
    out_c = cpu.restore(data["frame"], generated, m_c)
    out_g = gpu.restore(torch.from_numpy(data["frame"]).cuda(), generated.cuda(), m_c)
    err = np.abs(out_g.cpu().numpy().astype(int) - out_c)
    assert err.max() <= 1 and err.mean() < 0.01


def test_batches_equal_frame_by_frame(cases):
    """A chunk's warps and paste-backs done together (one transfer each way) equal them done one at a time."""
    data, meta = cases
    r = resolutions(meta)[0]
    frame = data["frame"]
    shifted = np.roll(frame, (7, -11), axis=(0, 1))
    anchors = data["landmarks3"]
    aligner = FaceAligner(r)
    matrices = [aligner.matrix(a) for a in anchors[:3]]
    frames = [frame, shifted, frame]
    batch = aligner.warp_batch(frames, matrices)
    for k in range(3):
        np.testing.assert_array_equal(batch[k], aligner.warp(frames[k], matrices[k]))
    faces = torch.from_numpy(data[f"r{r}.restore_face_in"])[None].repeat(3, 1, 1, 1)
    faces[1] = -faces[1]
    restored = aligner.restore_batch(frames, faces, matrices)
    for k in range(3):
        np.testing.assert_array_equal(restored[k], aligner.restore(frames[k], faces[k], matrices[k]))
    assert not np.array_equal(restored[0], frame) and not np.array_equal(restored[1], shifted)
