"""The GPU figures: the whole pipeline per stage, eager and compiled, at 512 (1.6) and 256 (1.5), with the checks
that only a GPU can make.

    python3 benchmarks/gpu_bench.py                # on the GPU: full-size random weights, 10.3 s of 720p
    python3 benchmarks/gpu_bench.py --dry          # anywhere, in minutes: tiny models on the CPU, 2 s clip

For each version (1.6 @ 512, 1.5 @ 256) and each mode (eager, ``compile=True``) it loads the pipeline (setup and
compile seconds), warms it on a short clip, then lip-syncs the clip once and records: wall, seconds per output
second, busy seconds per stage, GPU seconds per stage from CUDA events recorded on each stage's stream around its
work (the stage clocks time kernel launches, not kernels), the first chunk apart from the rest, peak VRAM
allocated and reserved, and GPU utilisation sampled by nvidia-smi every 100 ms. Then the checks:

* ``serial_equals_concurrent``: the stages one after another and concurrently give the same frames, byte for byte;
* ``compiled_vs_eager``: compiled frames within 2 grey levels of the eager ones (same clip, seed, version);
* ``sync_free_loop``: ``torch.cuda.set_sync_debug_mode("error")`` inside the denoising loop (from the first U-Net
  call of a chunk to its last step) finds no device→host sync (a serial run, so no other stage's syncs count);
* ``capped``: a run with ``torch.cuda.set_per_process_memory_fraction`` capping torch's memory at 8 GB (1.5) or
  12 GB (1.6) finishes (the cap leaves out the CUDA context's own ~0.5 GB).

Weights are random in upstream's formats and shapes, so only speed, memory and plumbing mean anything, never the
faces. Results go to ``$OUT/gpu_bench.json`` (or ``--out``) part by part, so a run cut short still reports; a
table is printed at the end.

On the device machine, which lacks diffusers, mediapipe and ffmpeg: ``bash ../shared/gpu/stage.sh`` from the
project's root, then one device call carrying ``.gpu`` (see ``../shared/gpu/README.md``):

    cd .gpu && python3 prep.py && cd .. && export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 &&
    timeout 560 python3 benchmarks/gpu_bench.py 2>&1 | tail -60

In ``--dry`` mode ``compile`` uses dynamo's ``eager`` backend (inductor takes minutes on a CPU): it checks the
plumbing, not the speed; the CUDA-only measurements and checks are skipped with a note.
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
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentsync.stages import StageClock  # noqa: E402

RESULTS: dict = {}
CAP_GB = {"1.5": 8, "1.6": 12}  # the cards each version must fit: upstream's 8 GB minimum, a 12 GB card for 1.6
GREY_LEVELS = 2  # compiled frames may differ from eager ones by this much


def skipped(what: str) -> dict:
    """A CUDA-only figure on the CPU: say so, in the results and on the console."""
    print(f"-- {what}: skipped (needs a CUDA GPU; --dry runs on the CPU)", flush=True)
    return {"skipped": "needs a CUDA GPU"}


class EventClock(StageClock):
    """A stage clock that also records a CUDA event pair on the current stream around each timed block, so each
    stage's GPU seconds can be read once the run is done; every clock made is kept in ``made``."""

    made: list[EventClock] = []

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        EventClock.made.append(self)

    @contextmanager
    def __call__(self, stage: str):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            with StageClock.__call__(self, stage):
                yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            with self._lock:
                self.events.append((stage, start, end))


def gpu_seconds(clocks: list[EventClock]) -> dict:
    """GPU seconds per stage over these clocks: the first block (the first chunk) and all the others."""
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for clock in clocks:
        for stage, start, end in clock.events:
            times.setdefault(stage, []).append(start.elapsed_time(end) / 1000)
    return {k: {"first_chunk": round(v[0], 3), "rest": round(sum(v[1:]), 3), "calls": len(v)}
            for k, v in times.items()}


def frames_of(pipe, video: Path, audio: Path, out: Path, *, serial: bool, **opts) -> dict[int, np.ndarray]:
    """Every output frame of a run, as pasted (before the codec)."""
    seen: dict[int, np.ndarray] = {}
    pipe.serial, pipe.frame_tap = serial, lambda j, frame: seen.setdefault(j, np.array(frame, copy=True))
    try:
        pipe.lipsync(video, audio, out, **opts)
    finally:
        pipe.serial, pipe.frame_tap = False, None
    return seen


def grey_levels(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict:
    """How far two runs' frames are apart: max and 99th percentile of the absolute difference, in grey levels."""
    if sorted(a) != sorted(b):
        return {"error": f"different frames: {len(a)} vs {len(b)}"}
    diff = np.concatenate([np.abs(a[j].astype(np.int16) - b[j]).ravel() for j in sorted(a)])
    return {"max": int(diff.max()), "p99": float(np.percentile(diff, 99)), "mean": round(float(diff.mean()), 4),
            "ok": int(diff.max()) <= GREY_LEVELS}


@contextmanager
def sync_debug_in_denoise_loop():
    """``set_sync_debug_mode("error")`` from each chunk's first U-Net call to the end of its loop: a device→host
    sync in the loop raises there."""
    import latentsync.stages.generate as generate_mod

    denoise = generate_mod.denoise

    class Strict:
        def __init__(self, unet):
            self.unet, self.device, self.dtype, self.config = unet, unet.device, unet.dtype, unet.config

        def __call__(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            return self.unet(*args, **kwargs)

    def strict_denoise(unet, *args, **kwargs):
        try:
            return denoise(Strict(unet), *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    generate_mod.denoise = strict_denoise
    try:
        yield
    finally:
        generate_mod.denoise = denoise


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
    """Setup, a warm-up run and one measured run of one version in one mode, then that mode's checks."""
    import gc

    import latentsync.render as render_mod
    from latentsync.pipeline import LipSync

    device = torch.device("cpu" if args.dry else "cuda")
    cuda = device.type == "cuda"
    extra = {"unet_config": weights / "unet.yaml", "syncnet_config": weights / "syncnet.yaml"} if args.dry else {}
    torch._dynamo.reset()  # compiled code of an earlier case holds its model: let it go before measuring memory
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = LipSync.from_pretrained(weights, version=version, device=device, compile=compiled,
                                   face_workers=args.face_workers, **extra)
    fig = {"setup_s": round(time.perf_counter() - t0, 1), "resolution": pipe.models.resolution,
           "dtype": str(pipe.models.dtype), "face_workers": pipe.face_workers,
           "syncnet_on": str(next(pipe.models.syncnet.parameters()).device) if pipe.models.syncnet else None}
    steps = 2 if args.dry else 20
    opts = {"seed": 0, "loop_mode": "cut_off", "inference_steps": steps, "guidance_scale": 1.5}
    t0 = time.perf_counter()
    pipe.lipsync(clips["warm"], speech, args.tmp / "warm.mp4", **opts)
    fig["warm_up_run_s"] = round(time.perf_counter() - t0, 1)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        render_mod.StageClock, EventClock.made = EventClock, []
    try:
        with GpuSampler(device) as gpu:
            r = pipe.lipsync(clips["main"], speech, args.tmp / f"out_{version}.mp4", **opts)
    finally:
        render_mod.StageClock = StageClock
    out_s = r.frames / r.fps
    busy = {k: v for k, v in r.seconds.items() if k != "wall"}
    fig.update(frames=r.frames, output_s=round(out_s, 2), wall_s=r.seconds["wall"],
               s_per_output_s=round(r.seconds["wall"] / out_s, 3),
               busy_over_wall=round(sum(busy.values()) / r.seconds["wall"], 2), stages_s=busy,
               stages_s_per_output_s={k: round(v / out_s, 3) for k, v in busy.items()}, gpu=gpu.summary())
    if cuda:
        fig["gpu_s"] = gpu_seconds(EventClock.made)
        fig["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        fig["peak_vram_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        fig["allocated_after_run_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    else:
        fig["gpu_s"] = skipped(f"{version} {('eager', 'compiled')[compiled]}: GPU seconds per stage, VRAM")
    fig["checks"] = checks(pipe, version, compiled, clips, speech, opts, args)
    pipe.close()
    return fig


EAGER_FRAMES: dict[str, dict[int, np.ndarray]] = {}  # version → the eager run's frames of the warm-up clip


def checks(pipe, version: str, compiled: bool, clips: dict[str, Path], speech: Path, opts: dict, args) -> dict:
    """The GPU checks of one case; each records its error instead of stopping the others."""
    cuda = pipe.models.device.type == "cuda"
    out: dict = {}

    def check(name: str, fn) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 — a failed check is a figure too
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}
        print(f"-- {version} {('eager', 'compiled')[compiled]} {name}: {out[name]}", flush=True)

    def concurrent_vs_serial() -> dict:
        concurrent = frames_of(pipe, clips["warm"], speech, args.tmp / "c.mp4", serial=False, **opts)
        serial = frames_of(pipe, clips["warm"], speech, args.tmp / "s.mp4", serial=True, **opts)
        if not compiled:
            EAGER_FRAMES[version] = concurrent
        same = sorted(serial) == sorted(concurrent) and all(np.array_equal(serial[j], concurrent[j]) for j in serial)
        return {"ok": same, "frames": len(serial)}

    def compiled_vs_eager() -> dict:
        if version not in EAGER_FRAMES:
            return {"skipped": "no eager run of this version before"}
        frames = frames_of(pipe, clips["warm"], speech, args.tmp / "k.mp4", serial=False, **opts)
        return grey_levels(frames, EAGER_FRAMES[version])

    def sync_free_loop() -> dict:
        with sync_debug_in_denoise_loop():
            frames_of(pipe, clips["warm"], speech, args.tmp / "d.mp4", serial=True, **opts)
        return {"ok": True}

    def capped() -> dict:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = CAP_GB[version] * 10**9
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        try:
            frames_of(pipe, clips["main"], speech, args.tmp / "m.mp4", serial=False, **opts)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        return {"ok": True, "cap_gb": CAP_GB[version],
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}

    check("serial_equals_concurrent", concurrent_vs_serial)
    if compiled:
        check("compiled_vs_eager", compiled_vs_eager)
    if cuda:
        check("sync_free_loop", sync_free_loop)
        if not compiled:
            check("capped", capped)
    else:
        out["sync_free_loop"] = skipped(f"{version}: set_sync_debug_mode('error') in the denoising loop")
        if not compiled:
            out["capped"] = skipped(f"{version}: run capped at {CAP_GB[version]} GB")
    return out


def table(results: dict) -> str:
    """Seconds per output second, GPU busy %, peak VRAM and the checks: one column per run."""
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
            ("GPU s: align, vae_encode, denoise, vae_decode, restore (rest / first chunk)",
             [", ".join(f"{g[s]['rest']:.2f}/{g[s]['first_chunk']:.2f}" if s in g else "-"
                        for s in ("align", "vae_encode", "denoise", "vae_decode", "restore"))
              if "skipped" not in (g := v.get("gpu_s", {})) else "skipped" for _, v in runs]),
            ("peak VRAM GiB allocated / reserved", [f"{v.get('peak_vram_allocated_gib')} / "
                                                    f"{v.get('peak_vram_reserved_gib')}" for _, v in runs]),
            ("setup s (compile)", [v["setup_s"] for _, v in runs]),
            *((f"check: {name}", [_verdict(v.get("checks", {}).get(name)) for _, v in runs])
              for name in ("serial_equals_concurrent", "compiled_vs_eager", "sync_free_loop", "capped"))]
    return "\n".join(f"| {name} | " + " | ".join(str(c) for c in cells) + " |" for name, cells in rows)


def _verdict(result: dict | None) -> str:
    """One table cell of a check: ok, FAILED, skipped or n/a, with its figure where it has one."""
    if result is None:
        return "n/a"
    if "skipped" in result:
        return "skipped"
    figure = f" (max {result['max']})" if "max" in result else ""
    return ("ok" if result.get("ok") else "FAILED") + figure


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
    clips = {"warm": make_clip(args.tmp / "clip_warm.mp4", 1.5, *size),
             "main": make_clip(args.tmp / "clip_main.mp4", seconds, *size)}
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
