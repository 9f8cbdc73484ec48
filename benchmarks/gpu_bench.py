"""The figures of issue 11's table on a lent GPU: the whole pipeline per stage, eager and compiled.

    python3 benchmarks/gpu_bench.py                # on the GPU: full-size random weights, 10.3 s of 720p
    python3 benchmarks/gpu_bench.py --dry          # anywhere, in a minute: tiny models on the CPU, 2 s clip

For each version (1.6 @ 512, 1.5 @ 256) and each mode (eager, ``compile=True``) it loads the pipeline (setup and
compile seconds), warms it on a short clip, then lip-syncs the clip once and records: wall, seconds per output
second, busy seconds per stage (and per output second), peak VRAM allocated, and GPU utilisation sampled by
nvidia-smi every 100 ms. Weights are random in upstream's formats and shapes, so only speed, memory and plumbing
mean anything, never the faces. Results go to ``$OUT/gpu_bench.json`` (or ``--out``) part by part, so a run cut
short still reports; a table is printed at the end.

On the device machine, which lacks diffusers, mediapipe and ffmpeg: ``bash ../shared/gpu/stage.sh`` from the
project's root, then one device call carrying ``.gpu`` (see ``../shared/gpu/README.md``):

    cd .gpu && python3 prep.py && cd .. && export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 &&
    timeout 560 python3 benchmarks/gpu_bench.py 2>&1 | tail -40

In ``--dry`` mode ``compile`` uses dynamo's ``eager`` backend (inductor takes minutes on a CPU): it checks the
plumbing, not the speed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import torch  # noqa: E402

RESULTS: dict = {}


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


class GpuSampler:
    """nvidia-smi's utilisation and memory every 100 ms while a block runs (nothing on a machine without it)."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.proc = device, [], None

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.rows.append(tuple(float(x) for x in line.split(",")))
            except ValueError:
                continue

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def summary(self) -> dict | None:
        if not self.rows:
            return None
        util = sorted(u for u, _ in self.rows)
        return {"samples": len(util), "util_mean": round(sum(util) / len(util), 1), "util_p50": util[len(util) // 2],
                "mem_used_max_mib": max(m for _, m in self.rows)}


def full_size_weights(folder: Path, device: torch.device) -> Path:
    """Random weights in upstream's formats and full shapes: U-Net (fp16 .pt), SD VAE, Whisper tiny, SyncNet."""
    from diffusers import AutoencoderKL

    from latentsync.config import config_path, load_config
    from latentsync.models.motion_module import PositionalEncoding
    from latentsync.models.syncnet import StableSyncNet
    from latentsync.models.unet import UNet3DConditionModel
    import tiny_weights

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "stable_syncnet.pt").is_file():
        return folder
    cfg = load_config(config_path("unet/stage2_512.yaml"))["model"]  # 1.5 and 1.6 share the network's shapes
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet3DConditionModel.from_config(cfg).state_dict().items()}
    g = torch.Generator(device).manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("pos_encoder.pe"):  # a fixed sinusoid table, not a weight
            state[key] = PositionalEncoding(shape[-1], shape[1]).pe.half()
        elif len(shape) == 1:
            bias = torch.empty(shape, device=device).normal_(0, 0.02, generator=g)
            state[key] = (bias + (1.0 if key.endswith(".weight") else 0.0)).half().cpu()
        else:
            std = 1 / math.sqrt(math.prod(shape[1:]))
            state[key] = torch.empty(shape, device=device, dtype=torch.float16).normal_(0, std, generator=g).cpu()
    torch.save({"global_step": 0, "state_dict": state}, folder / "latentsync_unet.pt")
    del state
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                  block_out_channels=(128, 256, 512, 512), sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder / "sd-vae-ft-mse")
    # Whisper tiny's width (384, the U-Net's cross-attention width) in the test helper's OpenAI-format writer;
    # its other sizes (2 heads instead of 6, a stub decoder) do not change what is timed.
    tiny_weights.AUDIO_DIM = 384
    tiny_weights.write_whisper(folder)
    net = StableSyncNet.from_config(load_config(config_path("syncnet/syncnet_16_pixel_attn.yaml"))["model"])
    torch.save({"state_dict": net.state_dict()}, folder / "stable_syncnet.pt")
    tiny_weights.write_mask(folder)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_case(version: str, compiled: bool, weights: Path, clips: dict[str, Path], speech: Path, args) -> dict:
    """Setup, a warm-up run and one measured run of one version in one mode."""
    from latentsync.pipeline import LipSync

    import gc

    device = torch.device("cpu" if args.dry else "cuda")
    extra = {"unet_config": weights / "unet.yaml", "syncnet_config": weights / "syncnet.yaml"} if args.dry else {}
    torch._dynamo.reset()  # compiled code of an earlier case holds its model: let it go before measuring memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = LipSync.from_pretrained(weights, version=version, device=device, compile=compiled,
                                   face_workers=args.face_workers, **extra)
    fig = {"setup_s": round(time.perf_counter() - t0, 1), "resolution": pipe.models.resolution, "dtype": str(pipe.models.dtype),
           "face_workers": pipe.face_workers}
    steps = 2 if args.dry else 20
    t0 = time.perf_counter()
    pipe.lipsync(clips["warm"], speech, args.tmp / "warm.mp4", seed=0, loop_mode="cut_off", inference_steps=steps)
    fig["warm_up_run_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler(device) as gpu:
        r = pipe.lipsync(clips["main"], speech, args.tmp / f"out_{version}.mp4", seed=0, loop_mode="cut_off",
                         inference_steps=steps, guidance_scale=1.5)
    out_s = r.frames / r.fps
    busy = {k: v for k, v in r.seconds.items() if k != "wall"}
    fig.update(frames=r.frames, output_s=round(out_s, 2), wall_s=r.seconds["wall"],
               s_per_output_s=round(r.seconds["wall"] / out_s, 3),
               busy_over_wall=round(sum(busy.values()) / r.seconds["wall"], 2), stages_s=busy,
               stages_s_per_output_s={k: round(v / out_s, 3) for k, v in busy.items()}, gpu=gpu.summary())
    if device.type == "cuda":
        fig["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        fig["allocated_after_run_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    pipe.close()
    return fig


def table(results: dict) -> str:
    """The issue's rows, one column per run."""
    runs = [(k, v) for k, v in results.items() if isinstance(v, dict) and "s_per_output_s" in v]
    rows = [("", [k for k, _ in runs]),
            ("s per output s", [v["s_per_output_s"] for _, v in runs]),
            ("denoise / rest (s)", [f"{v['stages_s'].get('denoise', 0):.1f} / "
                                    f"{v['wall_s'] - v['stages_s'].get('denoise', 0):.1f}" for _, v in runs]),
            ("faces, align, restore, encode, read (s)",
             [", ".join(f"{v['stages_s'].get(s, 0):.1f}" for s in ("faces", "align", "restore", "encode", "read"))
              for _, v in runs]),
            ("busy / wall", [v["busy_over_wall"] for _, v in runs]),
            ("GPU util mean %", [(v.get("gpu") or {}).get("util_mean") for _, v in runs]),
            ("peak VRAM GiB", [v.get("peak_vram_allocated_gib") for _, v in runs]),
            ("setup s (compile)", [v["setup_s"] for _, v in runs])]
    return "\n".join(f"| {name} | " + " | ".join(str(c) for c in cells) + " |" for name, cells in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny models on the CPU: checks the script, not the speed")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_bench"))
    p.add_argument("--seconds", type=float, default=None, help="clip length (default 10.3, dry 2)")
    p.add_argument("--versions", nargs="+", default=["1.6", "1.5"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--face-workers", type=int, default=None, help="detection processes (default: by cores)")
    args = p.parse_args()
    args.tmp = _mkdir(Path("/tmp/latentsync-gpu-bench"))
    if not args.dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry to check the script on the CPU")
    if args.dry:
        import latentsync.models.compiled as compiled_mod

        compiled_mod.BACKEND = "eager"
    from media_utils import speech as make_speech
    from pipeline_bench import make_clip

    seconds = args.seconds or (2.0 if args.dry else 10.3)
    size = (320, 240) if args.dry else (1280, 720)
    RESULTS["env"] = {"torch": torch.__version__, "dry": args.dry, "cores": os.cpu_count(),
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry else None}
    t0 = time.perf_counter()
    if args.dry:
        from tiny_weights import make_tiny_weights

        weights, _ = make_tiny_weights(args.tmp / "tiny")
    else:
        weights = full_size_weights(args.tmp / "weights", torch.device("cuda"))
    clips = {"warm": make_clip(args.tmp / "warm.mp4", 1.5, *size),
             "main": make_clip(args.tmp / "main.mp4", seconds, *size)}
    speech = make_speech(args.tmp / "speech.wav", seconds + 1)
    RESULTS["prepare_s"] = round(time.perf_counter() - t0, 1)
    save(args.out)
    for version in args.versions:
        for mode in args.modes:
            name = f"{version}_{mode}"
            try:
                RESULTS[name] = run_case(version, mode == "compiled", weights, clips, speech, args)
            except Exception:  # noqa: BLE001 — one failing case must not lose the others' figures
                RESULTS[name] = {"error": traceback.format_exc()[-3000:]}
            print(f"== {name}: {json.dumps(RESULTS[name], default=str)[:1500]}", flush=True)
            save(args.out)
    print(table(RESULTS))


if __name__ == "__main__":
    main()
