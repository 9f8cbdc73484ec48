"""The GPU figures: the whole pipeline per stage, eager and compiled, at 512 (1.6) and 256 (1.5), with the checks
that only a GPU can make.

    python3 benchmarks/gpu_bench.py                # on the GPU: full-size random weights, 10.3 s of 720p
    python3 benchmarks/gpu_bench.py --dry          # anywhere, in minutes: tiny models on the CPU, 2 s clip

It runs what users run: the library's default loop mode (``bounce``, ``latentsync.options``; the speech is a
little longer than each clip, so every run bounces), the device left out (``devices.pick_device(None)`` picks it,
as for every Cog prediction) and the CUDA allocator's expandable segments, set as the front doors set them.

For each version (1.6 @ 512, 1.5 @ 256) and each mode (eager, ``compile=True``) it loads the pipeline (setup and
compile seconds), warms it on a short clip, then lip-syncs the clip once and records: wall, seconds per output
second, busy seconds per stage, GPU seconds per stage from CUDA events (the stage clocks time kernel launches, not
kernels), the first chunk apart from the rest, peak VRAM allocated and reserved, and GPU utilisation and used
memory sampled by nvidia-smi every 100 ms. The events of a timed block go on the stream of the stage that runs it
(the stage's ``stream``; the thread's current stream of the device for a stage without one), so a stage that
queues its kernels on a stream of its own is timed there, not on the default stream. Then the checks:

* ``serial_equals_concurrent``: the stages one after another and concurrently give the same frames, byte for byte;
* ``compiled_vs_eager``: compiled frames within 2 grey levels of the eager ones (same clip, seed, version);
* ``sync_free_loop``: ``torch.cuda.set_sync_debug_mode("error")`` inside the denoising loop (from the first U-Net
  call of a chunk to its last step) finds no device→host sync (a serial run, so no other stage's syncs count);
* ``capped``: a run finishes with ``torch.cuda.set_per_process_memory_fraction`` capping torch at the memory of an
  8 GB card (1.5) or a 12 GB card (1.6) less 1 GiB for the CUDA context, which the cap does not count: 7 and
  11 GiB; nvidia-smi's peak (the context included) is reported beside torch's peak reserved.

Weights are random in upstream's formats and shapes, so only speed, memory and plumbing mean anything, never the
faces. Results go to ``$OUT/gpu_bench.json`` (or ``--out``) part by part, so a run cut short still reports; a
table is printed at the end.

On the device machine, which lacks diffusers, mediapipe and ffmpeg: ``bash ../shared/gpu/stage.sh`` from the
project's root, then one device call carrying ``.gpu`` (see ``../shared/gpu/README.md``):

    cd .gpu && python3 prep.py && cd .. && export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 &&
    timeout 560 python3 benchmarks/gpu_bench.py 2>&1 | tail -60

In ``--dry`` mode ``compile`` uses dynamo's ``eager`` backend (inductor takes minutes on a CPU): it checks the
plumbing, not the speed; the CUDA-only measurements and checks are skipped with a note. Importing this file runs
nothing (``device_run.py`` reuses its helpers); ``main`` does the work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentsync import devices  # noqa: E402
from latentsync.control import StageClock  # noqa: E402
from latentsync.options import LOOP_MODE  # noqa: E402

RESULTS: dict = {}
CAP_GB = {"1.5": 8, "1.6": 12}  # the cards each version must fit: upstream's 8 GB minimum, a 12 GB card for 1.6
# What a card loses to the CUDA context and the cuDNN/cuBLAS modules before torch allocates anything; the allocator
# cap does not count it (pytorch#58466), so a cap of the whole card would pass runs that the card cannot hold.
CONTEXT_GIB = 1
GREY_LEVELS = 2  # compiled frames may differ from eager ones by this much
WARM_S = 1.5  # the warm-up clip, which the checks run too
# Speech past each clip's end: ``bounce`` (the default) plays the clip backwards there, so every run goes through
# the mode users get. Short, because the checks run the warm clip several times.
BOUNCE_S = {"warm": 0.5, "main": 1.0}


def skipped(what: str) -> dict:
    """A CUDA-only figure on the CPU: say so, in the results and on the console."""
    print(f"-- {what}: skipped (needs a CUDA GPU; --dry runs on the CPU)", flush=True)
    return {"skipped": "needs a CUDA GPU"}


def memory_cap(card_gib: float, total_bytes: int) -> float:
    """The ``set_per_process_memory_fraction`` of a GPU of ``total_bytes`` that leaves torch what a card of
    ``card_gib`` GiB has once its CUDA context is made: (card − ``CONTEXT_GIB``) GiB."""
    return min(1.0, (card_gib - CONTEXT_GIB) * 2**30 / total_bytes)


# The stream of the stage whose call this thread is running (set by ``_OnItsStream``); unset outside the stages.
_STAGE = threading.local()


class EventClock(StageClock):
    """A stage clock that also records a CUDA event pair around each timed block, so each stage's GPU seconds can be
    read once the run is done; every clock made is kept in ``made``.

    Both events go on the stream of the stage calling the clock (its ``stream``), whatever stream is current when
    the clock is entered: a stage may enter its clock before switching to its stream (align and score did), and
    events on the default stream then time the default stream, not the stage's kernels. In a stage without a stream
    of its own, or outside the stages, they go on this thread's current stream of ``device`` (the run's device;
    None: the current device).
    """

    made: list[EventClock] = []
    device: torch.device | None = None

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        EventClock.made.append(self)

    @contextmanager
    def __call__(self, stage: str):
        stream = getattr(_STAGE, "stream", None)
        if stream is None:
            stream = torch.cuda.current_stream(EventClock.device)
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            with StageClock.__call__(self, stage):
                yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)  # the start's stream, even if the block changed the current one
            with self._lock:
                self.events.append((stage, start, end))


class _OnItsStream:
    """A synthesis stage whose calls let this thread's ``EventClock`` blocks know the stage's stream. The stream is
    read from the stage at each call, by name (``stream``), so stages that gain, lose or re-make streams need no
    change here; every other attribute is the stage's own."""

    # Stage class → ("own", priority) of its stream, or ("current", priority) of the thread's current stream of
    # the device, which its events go on when it has none: what each stage was timed on, for the report.
    streams: dict[str, tuple[str, int]] = {}

    def __init__(self, stage):
        self._stage = stage

    def __call__(self, item):
        stream = getattr(self._stage, "stream", None)
        if stream is not None:
            _OnItsStream.streams[type(self._stage).__name__] = ("own", stream.priority)
        else:
            _OnItsStream.streams[type(self._stage).__name__] = ("current",
                                                                torch.cuda.current_stream(EventClock.device).priority)
        outer = getattr(_STAGE, "stream", None)  # restored after: a serial run may call every stage from one thread
        _STAGE.stream = stream
        try:
            return self._stage(item)
        finally:
            _STAGE.stream = outer

    def __getattr__(self, name: str):
        return getattr(self._stage, name)


@contextmanager
def stage_events(device: torch.device):
    """Inside, every render's stage clocks are ``EventClock``s (yielded: the list they are kept in) and each stage
    the renderer runs records its events on its own stream (``_OnItsStream``)."""
    import latentsync.render as render_mod

    if not hasattr(render_mod, "run_stages"):  # the renderer changed: say so, rather than time the wrong streams
        raise RuntimeError("latentsync.render.run_stages is gone: adapt stage_events to how stages are run now")
    clock, run = render_mod.StageClock, render_mod.run_stages

    def run_on_their_streams(items, stages, *args, **kwargs):
        return run(items, [_OnItsStream(s) for s in stages], *args, **kwargs)

    EventClock.made, EventClock.device, _OnItsStream.streams = [], device, {}
    render_mod.StageClock, render_mod.run_stages = EventClock, run_on_their_streams
    try:
        yield EventClock.made
    finally:
        render_mod.StageClock, render_mod.run_stages = clock, run


def gpu_seconds(clocks: list[EventClock]) -> dict:
    """GPU seconds per stage over these clocks: the first block (the first chunk) and all the others."""
    times: dict[str, list[float]] = {}
    for clock in clocks:
        for stage, start, end in clock.events:
            end.synchronize()  # on whichever device and stream the block ran
            times.setdefault(stage, []).append(start.elapsed_time(end) / 1000)
    return {k: {"first_chunk": round(v[0], 3), "rest": round(sum(v[1:]), 3), "calls": len(v)}
            for k, v in times.items()}


def frames_of(pipe, video: Path, audio: Path, out: Path, *, serial: bool, **opts) -> dict[int, np.ndarray]:
    """Every output frame of a run, as pasted (before the codec)."""
    seen: dict[int, np.ndarray] = {}
    pipe.serial, pipe.frame_tap = serial, lambda j, frame: seen.setdefault(j, np.array(frame, copy=True))
    try:
        pipe.lipsync(video, audio, out, overwrite=True, **opts)  # the bench reuses its names
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


def smi_id(device: torch.device) -> str:
    """``device`` as nvidia-smi's ``-i`` names it: by UUID where torch reports one (torch's indices count only the
    devices CUDA_VISIBLE_DEVICES leaves, nvidia-smi's count them all), else by torch's index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "")).removeprefix("GPU-")
    return f"GPU-{uuid}" if re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", uuid) else str(index)


class GpuSampler:
    """nvidia-smi's utilisation and used memory of ``device`` every 100 ms while a block runs, read by a background
    thread; no samples off CUDA or without nvidia-smi (its figures then read "n/a")."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.proc, self.reader = torch.device(device), [], None, None

    def command(self) -> list[str]:
        """One nvidia-smi that prints a row per 100 ms until stopped (an argument list: no shell in between)."""
        return ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                "-i", smi_id(self.device), "-lms", "100"]

    def __enter__(self) -> GpuSampler:
        if self.device.type == "cuda":
            try:
                self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             text=True)
            except OSError:  # not installed (or not runnable): the run goes on, unsampled
                return self
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.rows.append(tuple(float(x) for x in line.split(",")))
            except ValueError:  # "[N/A]" or a message instead of figures
                continue

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=5)  # its last rows are in before anyone reads them

    def summary(self) -> dict | None:
        if not self.rows:
            return None
        util = sorted(u for u, _ in self.rows)
        return {"samples": len(util), "util_mean": round(sum(util) / len(util), 1), "util_p50": util[len(util) // 2],
                "mem_used_max_mib": max(m for _, m in self.rows)}

    def peak_gib(self) -> float | str:
        """nvidia-smi's peak used memory in GiB, the CUDA context included; "n/a" without samples."""
        return round(max(m for _, m in self.rows) / 1024, 2) if self.rows else "n/a"


def full_size_weights(folder: Path, device: torch.device) -> Path:
    """Random weights in upstream's formats and full shapes: U-Net (fp16 .pt), SD VAE, Whisper tiny, SyncNet."""
    from diffusers import AutoencoderKL

    import tiny_weights
    from latentsync.config import config_path, load_config
    from latentsync.models.motion_module import PositionalEncoding
    from latentsync.models.syncnet import StableSyncNet
    from latentsync.models.unet import UNet3DConditionModel

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


def run_case(version: str, compiled: bool, weights: Path, clips: dict[str, Path], speech: dict[str, Path],
             args) -> dict:
    """Setup, a warm-up run and one measured run of one version in one mode, then that mode's checks."""
    import gc

    from latentsync.pipeline import LipSync

    # The device is left out, as users leave it: pick_device(None) then picks it (the current CUDA device). Only a
    # dry run on a machine with a GPU names the CPU, where --dry promises to run.
    spec = "cpu" if args.dry and torch.cuda.is_available() else None
    cuda = devices.pick_device(spec).type == "cuda"
    extra = {"unet_config": weights / "unet.yaml", "syncnet_config": weights / "syncnet.yaml"} if args.dry else {}
    torch._dynamo.reset()  # compiled code of an earlier case holds its model: let it go before measuring memory
    gc.collect()
    if cuda:  # the current device: the one pick_device(None) picks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = LipSync.from_pretrained(weights, version=version, device=spec, compile=compiled,
                                   face_workers=args.face_workers, **extra)
    device = pipe.models.device
    fig = {"setup_s": round(time.perf_counter() - t0, 1), "device": str(device), "resolution": pipe.models.resolution,
           "dtype": str(pipe.models.dtype), "face_workers": pipe.face_workers,
           "syncnet_on": str(next(pipe.models.syncnet.parameters()).device) if pipe.models.syncnet else None}
    steps = 2 if args.dry else 20
    opts = {"seed": 0, "inference_steps": steps, "guidance_scale": 1.5}  # loop mode: the library's default
    t0 = time.perf_counter()
    pipe.lipsync(clips["warm"], speech["warm"], args.tmp / "warm.mp4", overwrite=True, **opts)
    fig["warm_up_run_s"] = round(time.perf_counter() - t0, 1)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with stage_events(device) if cuda else nullcontext() as clocks, GpuSampler(device) as gpu:
        r = pipe.lipsync(clips["main"], speech["main"], args.tmp / f"out_{version}.mp4", overwrite=True, **opts)
    out_s = r.frames / r.fps
    busy = {k: v for k, v in r.seconds.items() if k != "wall"}
    fig.update(frames=r.frames, output_s=round(out_s, 2), wall_s=r.seconds["wall"],
               s_per_output_s=round(r.seconds["wall"] / out_s, 3),
               busy_over_wall=round(sum(busy.values()) / r.seconds["wall"], 2), stages_s=busy,
               stages_s_per_output_s={k: round(v / out_s, 3) for k, v in busy.items()}, gpu=gpu.summary(),
               nvidia_smi_peak_gib=gpu.peak_gib())
    if cuda:
        fig["gpu_s"] = gpu_seconds(clocks)
        fig["event_streams"] = dict(_OnItsStream.streams)
        fig["peak_vram_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        fig["peak_vram_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        fig["allocated_after_run_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    else:
        fig["gpu_s"] = skipped(f"{version} {('eager', 'compiled')[compiled]}: GPU seconds per stage, VRAM")
    fig["checks"] = checks(pipe, version, compiled, clips, speech, opts, args)
    pipe.close()
    return fig


EAGER_FRAMES: dict[str, dict[int, np.ndarray]] = {}  # version → the eager run's frames of the warm-up clip


def checks(pipe, version: str, compiled: bool, clips: dict[str, Path], speech: dict[str, Path], opts: dict,
           args) -> dict:
    """The GPU checks of one case; each records its error instead of stopping the others."""
    device = pipe.models.device
    cuda = device.type == "cuda"
    out: dict = {}

    def check(name: str, fn) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 — a failed check is a figure too
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}
        print(f"-- {version} {('eager', 'compiled')[compiled]} {name}: {out[name]}", flush=True)

    def concurrent_vs_serial() -> dict:
        concurrent = frames_of(pipe, clips["warm"], speech["warm"], args.tmp / "c.mp4", serial=False, **opts)
        serial = frames_of(pipe, clips["warm"], speech["warm"], args.tmp / "s.mp4", serial=True, **opts)
        if not compiled:
            EAGER_FRAMES[version] = concurrent
        same = sorted(serial) == sorted(concurrent) and all(np.array_equal(serial[j], concurrent[j]) for j in serial)
        return {"ok": same, "frames": len(serial)}

    def compiled_vs_eager() -> dict:
        if version not in EAGER_FRAMES:
            return {"skipped": "no eager run of this version before"}
        frames = frames_of(pipe, clips["warm"], speech["warm"], args.tmp / "k.mp4", serial=False, **opts)
        return grey_levels(frames, EAGER_FRAMES[version])

    def sync_free_loop() -> dict:
        with sync_debug_in_denoise_loop():
            frames_of(pipe, clips["warm"], speech["warm"], args.tmp / "d.mp4", serial=True, **opts)
        return {"ok": True}

    def capped() -> dict:
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = memory_cap(CAP_GB[version], total)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            with GpuSampler(device) as smi:
                frames_of(pipe, clips["main"], speech["main"], args.tmp / "m.mp4", serial=False, **opts)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return {"ok": True, "card_gb": CAP_GB[version], "cap_gib": round(fraction * total / 2**30, 2),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
                "nvidia_smi_peak_gib": smi.peak_gib(),
                "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries")}

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
            out["capped"] = skipped(f"{version}: run capped at {CAP_GB[version]} GB less {CONTEXT_GIB} GiB")
    return out


def table(results: dict) -> str:
    """Seconds per output second, GPU busy %, peak VRAM and the checks: one column per run."""
    runs = [(k, v) for k, v in results.items() if isinstance(v, dict) and "s_per_output_s" in v]
    gpu_stages = ("align", "vae_encode", "denoise", "vae_decode", "restore", "sync")
    rows = [("", [k for k, _ in runs]),
            ("s per output s", [v["s_per_output_s"] for _, v in runs]),
            ("denoise / rest (s)", [f"{v['stages_s'].get('denoise', 0):.1f} / "
                                    f"{v['wall_s'] - v['stages_s'].get('denoise', 0):.1f}" for _, v in runs]),
            ("faces, align, restore, encode, read (s)",
             [", ".join(f"{v['stages_s'].get(s, 0):.1f}" for s in ("faces", "align", "restore", "encode", "read"))
              for _, v in runs]),
            ("busy / wall", [v["busy_over_wall"] for _, v in runs]),
            ("GPU util mean %", [(v.get("gpu") or {}).get("util_mean", "n/a") for _, v in runs]),
            (f"GPU s: {', '.join(gpu_stages)} (rest / first chunk)",
             [", ".join(f"{g[s]['rest']:.2f}/{g[s]['first_chunk']:.2f}" if s in g else "-" for s in gpu_stages)
              if "skipped" not in (g := v.get("gpu_s", {})) else "skipped" for _, v in runs]),
            ("events on: stage's own / thread's current stream (priority)",
             [" ".join(f"{k.removesuffix('Stage')}:{kind}{p}" for k, (kind, p) in e.items())
              if (e := v.get("event_streams")) else "-" for _, v in runs]),
            ("peak GiB: allocated / reserved / nvidia-smi",
             [f"{v.get('peak_vram_allocated_gib', 'n/a')} / {v.get('peak_vram_reserved_gib', 'n/a')} / "
              f"{v.get('nvidia_smi_peak_gib', 'n/a')}" for _, v in runs]),
            ("setup s (compile)", [v["setup_s"] for _, v in runs]),
            *((f"check: {name}", [_verdict(v.get("checks", {}).get(name)) for _, v in runs])
              for name in ("serial_equals_concurrent", "compiled_vs_eager", "sync_free_loop", "capped")),
            ("capped GiB: cap / reserved / nvidia-smi",
             [f"{c['cap_gib']} / {c['peak_reserved_gib']} / {c['nvidia_smi_peak_gib']}" if "cap_gib" in c else "-"
              for c in (v.get("checks", {}).get("capped") or {} for _, v in runs)])]
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
    devices.use_expandable_segments()  # as every front door does, before torch first touches CUDA (just below)
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
    gpu = None if args.dry else devices.pick_device(None)  # what every case loads on (device left out)
    RESULTS["env"] = {"torch": torch.__version__, "dry": args.dry, "cores": os.cpu_count(), "loop_mode": LOOP_MODE,
                      "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "device": str(gpu or "cpu"),
                      "gpu": torch.cuda.get_device_name(gpu) if gpu is not None else None}
    t0 = time.perf_counter()
    if args.dry:
        from tiny_weights import make_tiny_weights

        weights, _ = make_tiny_weights(args.tmp / "tiny")
    else:
        weights = full_size_weights(args.tmp / "weights", gpu)
    lengths = {"warm": WARM_S, "main": seconds}
    clips = {k: make_clip(args.tmp / f"clip_{k}.mp4", s, *size) for k, s in lengths.items()}
    speech = {k: make_speech(args.tmp / f"speech_{k}.wav", s + BOUNCE_S[k]) for k, s in lengths.items()}
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
