"""Real test media made on the fly: astronaut face clips with a frame-number barcode, speech in several formats."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from latentsync.media import ffmpeg_exe

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SPEECH = REPO / "samples" / "speech.wav"
BARCODE_BITS = 9  # up to 512 frames
_CELL = 6


def face_frame(dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """A 320×240 RGB frame around the astronaut's face, shifted by a sub-pixel offset (gentle head motion)."""
    import cv2
    from skimage.data import astronaut

    img = astronaut()
    m = np.float32([[1, 0, -100 + dx], [0, 1, -20 + dy]])
    return cv2.warpAffine(img, m, (320, 240), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def stamp(frame: np.ndarray, index: int) -> np.ndarray:
    """Write ``index`` as a row of black/white cells in the top-right corner, far from the face."""
    out = frame.copy()
    w = out.shape[1]
    for b in range(BARCODE_BITS):
        x = w - (BARCODE_BITS - b) * (_CELL + 2)
        out[2:2 + _CELL, x:x + _CELL] = 255 if (index >> b) & 1 else 0
    return out


def read_stamp(frame: np.ndarray) -> int:
    """The index :func:`stamp` wrote, read back through codec noise."""
    w = frame.shape[1]
    value = 0
    for b in range(BARCODE_BITS):
        x = w - (BARCODE_BITS - b) * (_CELL + 2)
        if frame[3:1 + _CELL, x + 1:x + _CELL - 1].mean() > 128:
            value |= 1 << b
    return value


def write_clip(path: Path, frames, fps: float = 25.0, crf: int = 12) -> Path:
    """Encode RGB frames to H.264 with ffmpeg (an argument list, frames through a pipe)."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-crf", str(crf),
           "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)
    return path


def face_clip(path: Path, n: int, fps: float = 25.0, hide=()) -> Path:
    """A clip of ``n`` stamped astronaut frames; frames in ``hide`` have the face covered by a grey card."""
    frames = []
    for i in range(n):
        f = face_frame(3 * np.sin(i / 7), 2 * np.cos(i / 5))
        if i in hide:
            f[0:240, 40:260] = 90
        frames.append(stamp(f, i))
    return write_clip(path, frames, fps)


def speech(path: Path, seconds: float, *, rate: int = 16000, channels: int = 1, codec: list[str] | None = None) -> Path:
    """The sample speech, looped/cut to ``seconds``, converted to the given rate, channels and codec."""
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(SAMPLE_SPEECH),
           "-t", str(seconds), "-ar", str(rate), "-ac", str(channels), *(codec or []), str(path)]
    subprocess.run(cmd, check=True)
    return path


def decode_video(path: Path) -> np.ndarray:
    """Every frame of ``path`` as an (N, H, W, 3) uint8 array (test-sized clips only)."""
    info = probe_streams(path)
    v = next(s for s in info["streams"] if s["codec_type"] == "video")
    w, h = int(v["width"]), int(v["height"])
    raw = subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def decode_audio(path: Path, rate: int = 16000) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``rate``."""
    raw = subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path), "-vn", "-ac", "1",
                          "-ar", str(rate), "-f", "f32le", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.float32)


def _rate_text(rate) -> str:
    return f"{rate.numerator}/{rate.denominator}" if rate else "0/0"


def probe_streams(path: Path) -> dict:
    """Streams and format in ffprobe's JSON shape (``-show_streams -show_format -count_frames``), read with PyAV."""
    import av

    with av.open(str(path)) as container:
        streams = []
        for s in container.streams:
            entry = {"index": s.index, "codec_type": s.type, "codec_name": s.codec_context.name,
                     "time_base": _rate_text(s.time_base)}
            if s.duration is not None:
                entry["duration"] = f"{float(s.duration * s.time_base):.6f}"
            if s.type == "video":
                entry.update(width=s.codec_context.width, height=s.codec_context.height,
                             pix_fmt=s.codec_context.pix_fmt, avg_frame_rate=_rate_text(s.average_rate),
                             r_frame_rate=_rate_text(s.base_rate), nb_read_frames="0")
            elif s.type == "audio":
                entry.update(sample_rate=str(s.codec_context.sample_rate), channels=s.codec_context.channels)
            streams.append(entry)
        fmt = {"format_name": container.format.name, "nb_streams": len(streams)}
        if container.duration is not None:
            fmt["duration"] = f"{container.duration / 1e6:.6f}"
        counts = dict.fromkeys((s.index for s in container.streams.video), 0)
        # demux() with no streams named reads them all: an audio-only file has no frames to count.
        for packet in container.demux(*container.streams.video) if counts else ():
            counts[packet.stream.index] += len(packet.decode())
    for entry in streams:
        if entry["index"] in counts:
            entry["nb_read_frames"] = str(counts[entry["index"]])
    return {"streams": streams, "format": fmt}


def frame_times(path: Path) -> list:
    """Exact presentation time (a Fraction of seconds) of every decoded frame of the first video stream."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def mux(video: Path, audio: Path, out: Path) -> Path:
    """``video`` with ``audio`` as its soundtrack (video stream copied)."""
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-i", str(audio),
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", str(out)], check=True)
    return out


def tone(path: Path, seconds: float) -> Path:
    """A spoken-band warbling tone as 16 kHz PCM16 wav: enough for tiny random weights (real speech: ``speech``)."""
    import wave

    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path
