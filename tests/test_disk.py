"""Full disks, on real (small tmpfs) file systems: recognised wherever we write, named, and nothing left behind."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from latentsync import ResourceError, media, video
from media_utils import face_clip


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (and inode count) under tmp_path; skips where mounting is not allowed."""
    mounted = []

    def mount(size: str, inodes: int | None = None) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode(errors='replace').strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def _noise(n: int, width: int = 320, height: int = 240) -> list[np.ndarray]:
    """Frames that do not compress: a few of them fill a small disk."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_full_temporary_folder_while_encoding(small_disk, monkeypatch):
    disk = small_disk("256k")
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # what TMPDIR=disk does to a fresh process
    work = disk / "latentsync-run"
    writer = video.VideoWriter(work / "video.mp4", 25, 320, 240, expected_frames=25)
    with pytest.raises(ResourceError) as caught:
        for frame in _noise(25):
            writer.write(frame)
        writer.close()
    message = str(caught.value)
    assert f"no space left on the disk holding {work}" in message
    assert "temporary folder; TMPDIR chooses where it is" in message and "video.mp4" in message
    assert "MiB needed" in message and " free; " in message and "\n" not in message
    assert _leftovers(disk) == [] and writer._proc.returncode is not None


def test_full_output_disk_while_muxing(small_disk, tmp_path):
    disk = small_disk("192k")
    silent = tmp_path / "silent.mp4"
    with video.VideoWriter(silent, 25, 320, 240) as writer:
        for frame in _noise(12):
            writer.write(frame)
    assert silent.stat().st_size > 256 << 10  # more than the output disk holds
    voice = tmp_path / "voice.wav"
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=d=1", str(voice)], check=True)
    out = disk / "result.mp4"
    with pytest.raises(ResourceError, match=rf"no space left on the disk holding {disk} \(the output folder; "
                                            r"writing result\.mp4\): about [0-9.]+ MiB needed"):
        video.mux_audio(silent, voice, out, duration=12 / 25)
    assert _leftovers(disk) == []


def test_no_inode_left_for_the_output_folder(small_disk):
    disk = small_disk("1m", inodes=2)  # the root takes one, the file below the other
    (disk / "taken").write_bytes(b"x")
    with pytest.raises(ResourceError, match=f"no space left on the disk holding {disk / 'sub'}"):
        video.VideoWriter(disk / "sub" / "video.mp4", 25, 64, 48)


def test_free_space_is_checked_before_a_run(small_disk, tmp_path):
    disk = small_disk("1m")
    media.check_free_space(disk, disk / "out.mp4", 400 << 10)  # 2 × 400 KiB fit in 1 MiB
    with pytest.raises(ResourceError, match=rf"disk holding {disk} \(the output folder\): about 1\.2 MiB needed"):
        media.check_free_space(disk, disk / "out.mp4", 600 << 10)  # temp and output on one disk: twice
    media.check_free_space(tmp_path, disk / "out.mp4", 600 << 10)  # on two disks: once each
    with pytest.raises(ResourceError, match=r"\(the temporary folder; TMPDIR chooses where it is\): about 2\.0 MiB"):
        media.check_free_space(disk, tmp_path / "out.mp4", 2 << 20)


def test_estimate_covers_a_real_output(tmp_path):
    """The preflight estimate is above what a run really writes for a face video (without its fixed margin too)."""
    clip = face_clip(tmp_path / "face.mp4", 50)
    info = video.probe(clip)
    out = tmp_path / "out.mp4"
    with video.VideoWriter(out, 25, info.width, info.height) as writer:
        for frame in video.read_frames(clip, 25, info=info):
            writer.write(frame)
    estimate = media.estimate_video_bytes(info.width, info.height, 50, 25.0, with_audio=False)
    assert out.stat().st_size < estimate - media._SPACE_MARGIN_BYTES
    assert media.estimate_video_bytes(1920, 1080, 25 * 60, 25.0) > media.estimate_video_bytes(1920, 1080, 25 * 60, 25.0,
                                                                                              with_audio=False)


def test_free_bytes_of_a_folder_not_created_yet(tmp_path):
    assert media.free_bytes(tmp_path / "not" / "yet") == media.free_bytes(tmp_path) > 0
    assert media.is_disk_full(b"[out#0/mp4] Error closing file: No space left on device")
    assert media.is_disk_full_error(OSError(28, os.strerror(28)))


def test_a_tiny_job_needs_little_room():
    # 2 s of 320×240 with its audio (about 185 KB written): a disk with a few MiB free holds it, twice over.
    needed = media.estimate_video_bytes(320, 240, 50, 25.0)
    assert 100 << 10 < needed < 3 << 20
