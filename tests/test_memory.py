"""Flat host memory on glibc: blocks of a frame's size are mmapped and handed back when freed, whatever sizes were
freed before (``hardware.map_large_buffers``, set before the models load). The peak's ratio by video length is
measured by benchmarks/memory_bench.py; here, the allocator behaviour it rests on."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

# 200 blocks of 1 MiB, a small block pinned after each (as the stages' small objects pin a heap), then freed: how
# many MiB of resident memory the process hands back. One 1 MiB block freed first raises glibc's default threshold
# past that size, as the first frames of a run do.
_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "mapped":
    from latentsync.hardware import map_large_buffers
    assert map_large_buffers()
libc.free(libc.malloc(1 << 20))
blocks, pins = [], []
for _ in range(200):
    block = libc.malloc(1 << 20)
    ctypes.memset(block, 1, 1 << 20)
    blocks.append(block)
    pins.append(libc.malloc(64))
before = rss()
for block in blocks:
    libc.free(block)
print((before - rss()) >> 20)
"""


def _handed_back(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_frame_sized_blocks_go_back_to_the_system():
    assert _handed_back("default") < 50  # glibc's own rule: they stay in the heap, fragmenting it
    assert _handed_back("mapped") >= 190


def test_loading_the_models_maps_large_buffers_first(monkeypatch, tmp_path):
    from latentsync import pipeline

    calls = []

    def load(*args, **kwargs):
        calls.append("loaded")
        raise RuntimeError("stop")

    monkeypatch.setattr(pipeline, "map_large_buffers", lambda: calls.append("mapped"))
    monkeypatch.setattr(pipeline, "load_models", load)
    with pytest.raises(RuntimeError, match="stop"):
        pipeline.LipSync.from_pretrained(tmp_path, device="cpu")
    assert calls == ["mapped", "loaded"]
