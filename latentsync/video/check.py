"""Whether a video file we wrote is finished: ``is_complete`` walks an MP4/MOV's top-level boxes and probes it."""
from __future__ import annotations

import math
from pathlib import Path

from latentsync.errors import InputError
from latentsync.video.probe import probe


def is_complete(path: Path) -> bool:
    """A finished output: a probe finds video and audio in it and, for MP4/MOV, its top-level boxes tile the whole
    file (a cut-off write does not). Outputs only ever appear by rename, so this is the second line of defence."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        iso = f.read(8)[4:] == b"ftyp"
    if iso and not _boxes_complete(path):
        return False
    try:
        # No input caps here: an output may rightly outlast them (a short video looped over long audio).
        info = probe(path, max_side=2**31, max_duration=math.inf)
    except InputError:
        return False
    return info.has_audio and info.frame_count > 0


def _boxes_complete(path: Path) -> bool:
    """The ISO-BMFF box walk: ftyp, moov and mdat present, and the last box ends exactly at the end of the file."""
    size = path.stat().st_size
    seen = set()
    with path.open("rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if length == 1:  # 64-bit size follows the type
                if len(head) < 16:
                    return False
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:  # "to the end of the file": what a writer leaves before it finalises
                return False
            if length < 8:
                return False
            seen.add(kind)
            pos += length
    return pos == size and {b"ftyp", b"moov", b"mdat"} <= seen
