"""Joining rendered parts: our own silent H.264 files, concatenated by stream copy (no re-encode)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from latentsync import media


def join_parts(parts: list[Path], out: Path) -> Path:
    """Concatenate ``parts`` (silent MP4s written by one ``VideoWriter`` configuration) into ``out``.

    Only for files this process wrote: the concat demuxer reads the paths listed, so user files never go here
    (they go through ``media.safe_input_args``).
    """
    listing = out.with_suffix(".txt")
    # The concat list quotes each path; a quote inside one is written the way the demuxer unescapes it.
    lines = ["file '" + str(Path(p).resolve()).replace("'", "'\\''") + "'" for p in parts]
    listing.write_text("ffconcat version 1.0\n" + "\n".join(lines) + "\n")
    cmd = media.ffmpeg_command("-y", "-f", "concat", "-safe", "0", "-protocol_whitelist", "file", "-i", str(listing),
                               "-map", "0:v:0", "-c", "copy", "-movflags", "+faststart", str(out))
    try:
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False, env=media.ffmpeg_env())
    finally:
        listing.unlink(missing_ok=True)
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        if media.is_disk_full(proc.stderr):
            raise media.disk_full_error(out, f"{media.TEMP_FOLDER}; joining rendered parts")
        detail = media.last_line(proc.stderr, f"exit status {proc.returncode}")
        raise RuntimeError(f"joining rendered parts failed ({detail})")
    return out
