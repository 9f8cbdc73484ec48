"""What every front door shows of a run: ``summary_lines`` (the CLI's and Cog's printed lines) and ``metrics`` (Cog's
metrics, the batch results line's figures)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from latentsync.result import LipSyncResult, metrics, summary_lines
from latentsync.syncscore import SyncScore

SCORE = SyncScore(offset0_cosine=0.61234, best_offset=-1, confidence=0.08766, windows=12, offsets=(-1, 0, 1),
                  mean_cosines=(0.7, 0.61234, 0.5))
# Cog's rule for a metric's name: up to 4 dotted segments, each a letter, then letters, digits, single underscores.
COG_NAME = re.compile(r"[A-Za-z](?:_?[A-Za-z0-9])*(?:\.[A-Za-z](?:_?[A-Za-z0-9])*){0,3}")


def _result(**fields) -> LipSyncResult:
    base = {"output": Path("out/talk.mp4"), "seed": 7, "frames": 100, "frames_with_face": 90, "fps": 25.0,
            "seconds": {"faces": 1.23456, "denoise": 4.0, "wall": 6.5}}
    return LipSyncResult(**{**base, **fields})


def test_a_whole_run_without_a_score_is_one_line():
    assert summary_lines(_result()) == ["wrote out/talk.mp4: 100 frames at 25 fps, 90 with a face, seed 7"]


def test_ranges_and_the_sync_score_get_a_line_each():
    lines = summary_lines(_result(ranges=((0.2, 0.4), (1.0, 1.52)), sync=SCORE, fps=29.97))
    assert lines == ["wrote out/talk.mp4: 100 frames at 29.97 fps, 90 with a face, seed 7",
                     "lip-synced 0.20-0.40, 1.00-1.52 s (90 frames with a face); the rest passed through",
                     "sync: offset-0 cosine 0.612, best offset -1 frames, confidence 0.088 (12 windows)"]


def test_without_the_output_the_first_line_names_no_path():
    lines = summary_lines(_result(sync=SCORE), show_output=False)
    assert lines[0] == "seed: 7; 100 frames, 90 with a face" and "out/talk.mp4" not in "\n".join(lines)
    assert lines[1:] == summary_lines(_result(sync=SCORE))[1:]


def test_metrics_are_json_numbers_under_names_cog_accepts():
    figures = metrics(_result(ranges=((0.2, 0.4000001),), sync=SCORE))
    assert json.loads(json.dumps(figures)) == figures
    assert figures == {"seed": 7, "frames": 100, "frames_with_face": 90, "fps": 25.0,
                       "seconds": {"faces": 1.235, "denoise": 4.0, "wall": 6.5},
                       "sync": {"offset0_cosine": 0.6123, "best_offset": -1, "confidence": 0.0877, "windows": 12},
                       "ranges": [[0.2, 0.4]]}
    names = [f"{k}.{inner}" if isinstance(v, dict) else k for k, v in figures.items()
             for inner in (v if isinstance(v, dict) else [None])]
    assert all(COG_NAME.fullmatch(name) for name in names), names


def test_a_run_without_a_score_or_ranges_says_so():
    figures = metrics(_result())
    assert figures["sync"] is None and figures["ranges"] == []


def test_the_summary_needs_no_torch():
    code = "import sys, latentsync.result; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0
