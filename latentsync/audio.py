"""The audio path: any user audio/video file → 16 kHz mono samples → Whisper's log-mel → per-frame windows.

LatentSync conditions each video frame on 50 tokens: 10 consecutive Whisper-encoder rows (20 ms each, from 80 ms
before to 120 ms after the frame) × 5 hidden states (the embeddings and the output of every encoder block, without
the final layer norm). The log-mel is upstream's (OpenAI Whisper's) recipe over the *whole* file, encoded in
independent 30 s windows by ``latentsync.models.whisper.AudioEncoder``; transformers' ``WhisperFeatureExtractor``
computes something else, so the mel is ours.

``wav2lip_mel`` is the other spectrogram, the one StableSyncNet listens to (``configs/audio.yaml``).
"""
from __future__ import annotations

import functools
import io
import logging
import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentsync import media
from latentsync.config import config_path, load_config
from latentsync.errors import InputError
from latentsync.options import OUTPUT_FPS, check_file

log = logging.getLogger(__name__)

# Whisper's front end (openai/whisper audio.py); everything else is derived from these.
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_LENGTH = 30  # seconds of audio per encoder window
N_FRAMES = CHUNK_LENGTH * SAMPLE_RATE // HOP_LENGTH  # 3000 mel frames per window
MEL_FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100
FEATURES_PER_SECOND = MEL_FRAMES_PER_SECOND // 2  # 50: the encoder's second conv has stride 2
LOG_MEL_FLOOR = 1e-10
LOG_MEL_RANGE = 8.0  # log10 units kept below the file's loudest bin
MIN_SAMPLES = 2 * HOP_LENGTH  # two mel frames make the shortest input that yields one encoder row

# Per-frame windows (upstream feature2chunks with audio_feat_length [2, 2]): from 2 video frames before to 3 after
# (exclusive) at upstream's 2 rows per frame, i.e. rows centre−4 … centre+5 = 200 ms around the frame.
UPSTREAM_FPS = OUTPUT_FPS  # the rate the windows were trained at (options.py holds the number)
WINDOW_OFFSETS = torch.arange(-2 * 2, (2 + 1) * 2)

# ffmpeg output frames/padding (AAC priming, mp3 frames) may lengthen an exactly-at-the-cap file by a few ms.
DURATION_SLACK_S = 0.1
_READ_SAMPLES = 1 << 16  # samples per read from ffmpeg's pipe
_STFT_BLOCK = N_FRAMES  # mel frames per STFT call: bounds the complex spectrogram held at once


# --------------------------------------------------------------------------------------------------- decoding
def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, *, max_duration: float = media.MAX_DURATION_S
) -> np.ndarray:
    """Decode the first audio stream of any file ffmpeg reads to float32 mono in [-1, 1] at ``sample_rate``.

    Samples go through 16-bit PCM, as upstream's loader does. Raises InputError for a missing, empty or unreadable
    file, a playlist or other refused format, a file without audio, no samples, or more than ``max_duration`` s.
    """
    path = check_file("audio", path)
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not math.isfinite(max_duration) or max_duration <= 0:
        raise ValueError(f"max_duration must be a positive number of seconds, got {max_duration}")
    # Decode at most one second past the cap: enough to tell "too long" without decoding unbounded input.
    decode_s = max_duration + 1
    url = media.file_url(path.resolve())  # "file:" so that a ':' in a file name is not read as a protocol
    cmd = media.ffmpeg_command(
        *media.safe_input_args(), "-i", url,
        "-map", "0:a:0", "-t", f"{decode_s:.3f}",
        "-f", "s16le", "-acodec", "pcm_s16le", "-ac", "1", "-ar", str(int(sample_rate)), "pipe:1",
    )
    log.debug("decoding audio: %s", cmd)
    # Room for everything ffmpeg may send; np.empty pages cost memory only once written.
    out = np.empty(math.ceil(decode_s * sample_rate) + _READ_SAMPLES, dtype=np.float32)
    with tempfile.TemporaryFile() as err, subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=media.ffmpeg_env()
    ) as proc:
        # stdout=PIPE with the default bufsize: Popen opens the pipe as an io.BufferedReader.
        assert isinstance(proc.stdout, io.BufferedIOBase)
        n = _read_pcm16(proc.stdout, out)
        if n > len(out):
            proc.kill()
        rc = proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if rc < 0 and n <= len(out):  # killed by a signal: ffmpeg crashed, which is not the file's fault
        raise RuntimeError(f"ffmpeg crashed (signal {-rc}) decoding the audio of {path.name}")
    if rc != 0 and n <= len(out):
        raise InputError(_decode_failure(path, url, stderr, rc))
    if n == 0:
        raise InputError(f"{path.name} contains no audio samples")
    if n > max_duration * sample_rate + DURATION_SLACK_S * sample_rate:
        raise InputError(f"{path.name} is longer than the {max_duration:g} s limit; trim it and try again")
    out.resize(n, refcheck=False)  # shrinks in place: no second copy of the samples
    return out


def _read_pcm16(stream: io.BufferedIOBase, out: np.ndarray) -> int:
    """Fill ``out`` with float samples from a 16-bit little-endian stream; the count, or len(out)+1 on overflow."""
    buf = bytearray(2 * _READ_SAMPLES)
    view = memoryview(buf)
    pending = n = 0  # bytes waiting in buf (an odd byte split across reads), samples written
    while True:
        got = stream.readinto(view[pending:])
        if not got:
            return n
        pending += got
        count = pending // 2
        if n + count > len(out):
            return len(out) + 1
        out[n : n + count] = np.frombuffer(buf, dtype="<i2", count=count)
        out[n : n + count] /= 32768.0  # upstream: int16 / 32768
        n += count
        if pending % 2:
            buf[0] = buf[pending - 1]
        pending %= 2


def _decode_failure(path: Path, url: str, stderr: str, rc: int) -> str:
    lines = [line.replace(f"{url}: ", "") for line in stderr.strip().splitlines() if line.strip()]
    if any("matches no streams" in line for line in lines):
        return f"{path.name} has no audio track; upload an audio file or a video with sound"
    if any("not on whitelist" in line for line in lines):
        return (f"{path.name} is not an accepted media file (playlists and non-media formats are refused); "
                "upload an ordinary audio or video file")
    detail = lines[-1] if lines else f"exit status {rc}"
    return f"{path.name} could not be read as audio (ffmpeg: {detail})"


# ----------------------------------------------------------------------------------------------- Whisper mel
@functools.cache
def _whisper_mel_filters() -> torch.Tensor:
    # = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), which OpenAI ships as assets/mel_filters.npz
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(N_FFT // 2 + 1, N_MELS, 0.0, SAMPLE_RATE / 2, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank.T.astype(np.float32))


def log_mel(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Whisper's normalised log-mel of a whole 16 kHz file: ``(80, len(wav) // 160)`` float32 on CPU."""
    audio = torch.as_tensor(wav, dtype=torch.float32).cpu()
    if audio.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {tuple(audio.shape)}")
    if audio.numel() < MIN_SAMPLES:
        raise InputError(f"the audio is too short ({audio.numel()} samples; at least {MIN_SAMPLES} are needed)")
    n_frames = audio.numel() // HOP_LENGTH  # torch.stft's last frame is dropped, as upstream does
    padded = F.pad(audio[None, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]  # stft(center=True)
    window = torch.hann_window(N_FFT)
    filters = _whisper_mel_filters()
    mel = torch.empty(N_MELS, n_frames)
    # The STFT in blocks of frames gives the same frames as one call, without a whole-file complex spectrogram.
    for start in range(0, n_frames, _STFT_BLOCK):
        stop = min(start + _STFT_BLOCK, n_frames)
        segment = padded[start * HOP_LENGTH : (stop - 1) * HOP_LENGTH + N_FFT]
        spec = torch.stft(segment, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        torch.matmul(filters, spec.abs() ** 2, out=mel[:, start:stop])
    mel = mel.clamp_(min=LOG_MEL_FLOOR).log10_()
    mel = torch.maximum(mel, mel.max() - LOG_MEL_RANGE, out=mel)  # the floor follows the loudest bin of the file
    return mel.add_(4.0).div_(4.0)


# ---------------------------------------------------------------------------------------- per-frame windows
def audio_frame_count(features: torch.Tensor, fps: float = UPSTREAM_FPS) -> int:
    """How many video frames the audio drives.

    At 25 fps upstream's count, ``T // 2 + 2`` (its loop appends one frame past the end before stopping, so the
    video runs about two frames past the audio). At any other fps: every frame whose timestamp ``i / fps`` lies
    within the features' duration ``T / 50`` s, i.e. ``floor(T · fps / 50) + 1`` — the last frame's window centre
    never passes the end of the features.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rows = features.shape[0]
    if fps == UPSTREAM_FPS:
        return rows // 2 + 2
    return math.floor(rows * fps / FEATURES_PER_SECOND + 1e-9) + 1  # 1e-9: a float fps (29.97) exactly on a frame


def audio_windows(features: torch.Tensor, start: int, stop: int, fps: float = UPSTREAM_FPS) -> torch.Tensor:
    """Audio tokens of video frames ``start … stop−1``: ``(stop − start, 10 · num_states, hidden_size)``.

    Frame ``i`` is centred on feature row ``round(i · 50 / fps)`` (``2i`` at 25 fps, exactly upstream's); its
    rows centre−4 … centre+5 are clamped to the features, and tokens are time-major, layer-minor.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rows, states, hidden = features.shape
    if rows == 0:
        raise ValueError("no audio features")
    centres = torch.round(torch.arange(start, stop, dtype=torch.float64) * (FEATURES_PER_SECOND / fps)).long()
    index = (centres[:, None] + WINDOW_OFFSETS).clamp_(0, rows - 1)  # (frames, 10)
    return features[index.to(features.device)].reshape(stop - start, len(WINDOW_OFFSETS) * states, hidden)


# ---------------------------------------------------------------------------------------- Wav2Lip-style mel
@functools.cache
def _wav2lip_params() -> dict:
    return load_config(config_path("audio.yaml"))["audio"]


@functools.cache
def _wav2lip_mel_filters() -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    hp = _wav2lip_params()
    bank = mel_filter_bank(hp["n_fft"] // 2 + 1, hp["num_mels"], float(hp["fmin"]), float(hp["fmax"]),
                           hp["sample_rate"], norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank.T)  # float64, like the rest of this computation


def wav2lip_mel(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised mel spectrogram (StableSyncNet's audio input) of 16 kHz samples: ``(80, 1 + N // hop)``."""
    from scipy.signal import lfilter

    hp = _wav2lip_params()
    y = np.asarray(wav, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {y.shape}")
    if hp["preemphasize"]:
        y = lfilter([1, -hp["preemphasis"]], [1], y)
    # librosa.stft defaults: centred frames, zero padding, periodic Hann window
    window = torch.hann_window(hp["win_size"], periodic=True, dtype=torch.float64)
    spec = torch.stft(torch.from_numpy(y), hp["n_fft"], hp["hop_size"], hp["win_size"], window=window,
                      center=True, pad_mode="constant", return_complex=True).abs()
    mel = (_wav2lip_mel_filters() @ spec).numpy()
    min_level = 10.0 ** (hp["min_level_db"] / 20)
    db = 20 * np.log10(np.maximum(min_level, mel)) - hp["ref_level_db"]
    if not hp["signal_normalization"]:
        return db.astype(np.float32)
    scaled = (db - hp["min_level_db"]) / -hp["min_level_db"]  # 0 … 1 over the dynamic range
    max_abs = hp["max_abs_value"]
    low = -max_abs if hp["symmetric_mels"] else 0.0
    out = (max_abs - low) * scaled + low
    if hp["allow_clipping_in_normalization"]:
        out = np.clip(out, low, max_abs)
    return out.astype(np.float32)
