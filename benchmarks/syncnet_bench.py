"""Cost of sync scoring (StableSyncNet over 16-frame windows at offsets −5…+5), per second of output video.

    .venv/bin/python benchmarks/syncnet_bench.py            # tiny parity model on CPU + FLOP counts
    .venv/bin/python benchmarks/syncnet_bench.py --full     # also the full-size model on CPU (takes /tmp/heavy.lock)

Prints wall time per output second on this machine's CPU (a proxy) and FLOPs per output second for the tiny and
the full-size network, which is what a GPU run costs in proportion to the U-Net's FLOPs.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import time
import wave
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from latentsync.audio import wav2lip_mel
from latentsync.config import config_path, load_config
from latentsync.models.syncnet import StableSyncNet
from latentsync.syncscore import SyncScorer
from latentsync.weights import load_syncnet

REPO = Path(__file__).resolve().parent.parent
PARITY = REPO.parent / "shared" / "parity"
FPS = 25


@contextmanager
def heavy_lock():
    with open("/tmp/heavy.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
    return pcm.mean(axis=1).astype(np.float32) / 32768.0


def passes_per_second(stride: int, max_offset: int) -> tuple[float, float]:
    """(visual windows, distinct audio windows) per output second, for a long clip."""
    visual = FPS / stride
    audio = min(FPS, visual * (2 * max_offset + 1))  # audio windows are shared between overlapping offsets
    return visual, audio


def flops(net_cfg: dict) -> tuple[int, int]:
    """(visual, audio) FLOPs of one window, counted on the meta device (no weights needed)."""
    with torch.device("meta"):
        net = StableSyncNet.from_config(net_cfg)
        x = torch.empty(1, net.config.visual_encoder.in_channels, 128, 256)
        m = torch.empty(1, 1, 80, 52)
    out = []
    for fn, arg in [(net.encode_visual, x), (net.encode_audio, m)]:
        with FlopCounterMode(display=False) as fc:
            fn(arg)
        out.append(fc.get_total_flops())
    return out[0], out[1]


def unet_flops_per_second(yaml_name: str, steps: int = 20, guidance: float = 1.5) -> float:
    """U-Net FLOPs per output second of video at upstream's defaults (16-frame chunks, CFG doubles the batch)."""
    from latentsync.models.unet import UNet3DConditionModel

    cfg = load_config(config_path(yaml_name))
    frames, side = cfg["data"]["num_frames"], cfg["data"]["resolution"] // 8
    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(cfg["model"])
        x = torch.empty(1, cfg["model"]["in_channels"], frames, side, side)
        audio = torch.empty(frames, 50, cfg["model"]["cross_attention_dim"])
    with FlopCounterMode(display=False) as fc:
        unet(x, 500, audio)
    return fc.get_total_flops() * steps * (2 if guidance > 1 else 1) * FPS / frames


def time_it(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also time the full-size model on CPU (random weights)")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--max-offset", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    v_per_s, a_per_s = passes_per_second(args.stride, args.max_offset)
    print(f"torch {torch.__version__}, {args.threads} CPU threads; stride {args.stride}, offsets ±{args.max_offset}: "
          f"{v_per_s:.3g} visual + {a_per_s:.3g} audio windows per output second")

    tiny_cfg = json.loads((PARITY / "syncnet_config.json").read_text())
    full_cfg = load_config(config_path("syncnet/syncnet_16_pixel_attn.yaml"))["model"]
    for name, cfg in [("tiny", tiny_cfg), ("full", full_cfg)]:
        fv, fa = flops(cfg)
        print(f"{name}: {fv / 1e9:.2f} GFLOP per visual window, {fa / 1e9:.3f} GFLOP per audio window → "
              f"{(fv * v_per_s + fa * a_per_s) / 1e9:.1f} GFLOP per output second")

        if name == "full":
            scoring = fv * v_per_s + fa * a_per_s
    for unet_yaml in ["unet/stage2.yaml", "unet/stage2_512.yaml"]:
        per_s = unet_flops_per_second(unet_yaml)
        print(f"U-Net {unet_yaml}: {per_s / 1e12:.0f} TFLOP per output second (20 steps, CFG) → full-size scoring "
              f"is {100 * scoring / per_s:.3f} % of it ({200 * scoring / per_s:.3f} % with DeepCache's ~2× saving)")

    # tiny parity model, whole scorer on a 10 s clip of real speech
    wav = read_wav(PARITY / "speech_10s.wav")
    seconds = len(wav) / 16000
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (int(seconds * FPS), 256, 256, 3), dtype=np.uint8)
    net = load_syncnet(tiny_cfg, PARITY / "syncnet_state_dict.safetensors")
    scorer = SyncScorer(net, stride=args.stride, max_offset=args.max_offset)
    t_mel = time_it(lambda: wav2lip_mel(wav))
    t_all = time_it(lambda: scorer(crops, wav))
    score = scorer(crops, wav)
    print(f"tiny, CPU: {t_all:.2f} s for {seconds:.1f} s of video ({score.windows} windows) = "
          f"{t_all / seconds:.3f} s per output second (of which Wav2Lip mel {t_mel / seconds:.4f} s)")

    if args.full:
        with heavy_lock():
            with torch.device("meta"):
                big = StableSyncNet.from_config(full_cfg)
            big = big.to_empty(device="cpu").eval().requires_grad_(False)
            for p in big.parameters():  # random weights: only the time matters
                torch.nn.init.normal_(p, std=0.02)
            x = torch.rand(1, 48, 128, 256) * 2 - 1
            m = torch.randn(2 * args.max_offset + 1, 1, 80, 52)
            with torch.inference_mode():
                tv = time_it(lambda: big.encode_visual(x), repeat=2)
                ta = time_it(lambda: big.encode_audio(m), repeat=2) / len(m)
            print(f"full, CPU: {tv:.2f} s per visual window, {ta:.3f} s per audio window → "
                  f"{tv * v_per_s + ta * a_per_s:.1f} s per output second")


if __name__ == "__main__":
    main()
