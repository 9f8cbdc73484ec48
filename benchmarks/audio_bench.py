"""Audio path on CPU: wall time and peak memory of decoding + Whisper-tiny features for 60 s and 600 s of speech.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/audio_bench.py [--seconds 60 600] [--weights tiny.pt]

Each case runs in its own process so that its peak RSS (getrusage) is its own. Audio: the parity speech repeated.
Weights: ``--weights``, else ``../shared/parity/whisper_tiny_en_openai.pt``, else a random tiny-sized encoder.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_WEIGHTS = REPO.parent / "shared" / "parity" / "whisper_tiny_en_openai.pt"
SPEECH = [REPO.parent / "shared" / "parity" / n for n in ("speech_35s.wav", "speech_10s.wav")]
TINY_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
             "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_case(wav_path: Path, weights: Path) -> dict:
    """One measurement, in this process: decode, features, then every frame's window 16 frames at a time."""
    import torch

    from latentsync import audio
    from latentsync.models.whisper import AudioEncoder

    encoder = AudioEncoder.from_pretrained(weights)
    audio.load_audio(SPEECH[-1])  # warm the code paths (ffmpeg, FFT, encoder) on a short file
    encoder.features_from_log_mel(audio.log_mel(audio.load_audio(SPEECH[-1])[: 2 * audio.SAMPLE_RATE]))
    base = _rss_mb()
    t0 = time.perf_counter()
    wav = audio.load_audio(wav_path)
    t1 = time.perf_counter()
    features = encoder.features_from_log_mel(audio.log_mel(wav))
    t2 = time.perf_counter()
    frames = audio.audio_frame_count(features)
    for start in range(0, frames, 16):
        audio.audio_windows(features, start, min(start + 16, frames))
    t3 = time.perf_counter()
    return {
        "audio_s": len(wav) / audio.SAMPLE_RATE, "threads": torch.get_num_threads(),
        "load_audio_s": t1 - t0, "features_s": t2 - t1, "windows_s": t3 - t2, "frames": frames,
        "features_mb": features.numel() * features.element_size() / 2**20, "wav_mb": wav.nbytes / 2**20,
        "rss_before_mb": base, "peak_rss_mb": _peak_mb(),
    }


def _write_speech(path: Path, seconds: float) -> None:
    """The parity speech repeated to ``seconds`` as a 16 kHz PCM16 wav."""
    pieces = []
    for p in SPEECH:
        with wave.open(str(p)) as f:
            pieces.append(np.frombuffer(f.readframes(f.getnframes()), dtype="<i2"))
    one = np.concatenate(pieces)
    n = int(seconds * 16000)
    samples = np.resize(one, n)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(samples.tobytes())


def _random_weights(path: Path) -> None:
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    d = TINY_DIMS
    config = WhisperConfig(num_mel_bins=d["n_mels"], d_model=d["n_audio_state"], encoder_layers=d["n_audio_layer"],
                           encoder_attention_heads=d["n_audio_head"], encoder_ffn_dim=4 * d["n_audio_state"])
    enc = WhisperEncoder(config)
    # back to OpenAI's names, by the library's own map (this is a benchmark, not a test of the map)
    from latentsync.weights import openai_to_transformers_key

    openai = {}
    hf = enc.state_dict()
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "positional_embedding", "ln_post.weight",
             "ln_post.bias"]
    for i in range(d["n_audio_layer"]):
        for m in ("attn.query", "attn.key", "attn.value", "attn.out", "attn_ln", "mlp.0", "mlp.2", "mlp_ln"):
            names += [f"blocks.{i}.{m}.weight"] + ([] if m == "attn.key" else [f"blocks.{i}.{m}.bias"])
    for name in names:
        openai[f"encoder.{name}"] = hf[openai_to_transformers_key(name)].half()
    torch.save({"dims": d, "model_state_dict": openai}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, nargs="+", default=[60, 600])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)  # internal: measure one file in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.weights)))
        return
    with tempfile.TemporaryDirectory(prefix="audio-bench-") as tmp:
        weights = args.weights or (SHARED_WEIGHTS if SHARED_WEIGHTS.is_file() else None)
        if weights is None:
            weights = Path(tmp) / "random_tiny.pt"
            _random_weights(weights)
        print(f"weights: {weights}")
        print(f"{'audio':>8} {'load_audio':>11} {'features':>9} {'windows':>8} {'frames':>7} {'features':>9} "
              f"{'RSS before':>11} {'peak RSS':>9} {'peak-before':>12}")
        for seconds in args.seconds:
            wav = Path(tmp) / f"speech_{seconds:g}s.wav"
            _write_speech(wav, seconds)
            out = subprocess.run([sys.executable, __file__, "--case", str(wav), "--weights", str(weights)],
                                 check=True, capture_output=True, text=True, cwd=REPO).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{r['audio_s']:7.0f}s {r['load_audio_s']:10.2f}s {r['features_s']:8.2f}s {r['windows_s']:7.2f}s "
                  f"{r['frames']:7d} {r['features_mb']:7.0f}MB {r['rss_before_mb']:9.0f}MB {r['peak_rss_mb']:7.0f}MB "
                  f"{r['peak_rss_mb'] - r['rss_before_mb']:10.0f}MB   (torch threads {r['threads']})")


if __name__ == "__main__":
    main()
