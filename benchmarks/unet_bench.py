"""Full-size LatentSync U-Net: checkpoint load time through ``load_unet`` vs reading the file, and CPU forward time.

Writes a random 1.27 B-parameter U-Net (the 1.5/1.6 layout) as an fp16 upstream ``.pt`` ({"global_step",
"state_dict"}) and as ``.safetensors`` into a temporary folder, then times:
  * reading the file's bytes (cold: the file is first dropped from the page cache with posix_fadvise),
  * ``load_unet(...)`` to float32 (cold and warm page cache) and to float16,
  * one fp32 forward on a 16-frame 256-px chunk (sample (1, 13, 16, 32, 32)): a full pass, and a DeepCache
    shallow pass.
Needs ~12 GB of RAM and ~5 GB of temporary disk: run it under ``flock /tmp/heavy.lock``.

    .venv/bin/python benchmarks/unet_bench.py [--skip-forward] [--repeats N]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentsync.config import config_path, load_config  # noqa: E402
from latentsync.models.motion_module import PositionalEncoding  # noqa: E402
from latentsync.models.unet import DeepCache, UNet3DConditionModel  # noqa: E402
from latentsync.weights import load_unet  # noqa: E402

CONFIG = config_path("unet/stage2.yaml")  # 1.5 layout = 1.6 layout; 256 px


def random_state_dict(model_cfg: dict, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random weights with sane scales, made tensor by tensor (no module init, no float32 copy)."""
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in UNet3DConditionModel.from_config(model_cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, (shape, _) in shapes.items():
        if k.endswith("pos_encoder.pe"):
            out[k] = PositionalEncoding(shape[-1], shape[1]).pe.to(dtype)
        elif len(shape) == 1:
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=g)
            out[k] = (t + (1.0 if k.endswith(".weight") else 0.0)).to(dtype)
        else:
            fan_in = math.prod(shape[1:])
            out[k] = torch.empty(shape, dtype=dtype).normal_(0, 1 / math.sqrt(fan_in), generator=g)
    return out


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def timed_load(path: Path, dtype: torch.dtype) -> tuple[float, UNet3DConditionModel]:
    t0 = time.perf_counter()
    model = load_unet(CONFIG, path, dtype=dtype)
    return time.perf_counter() - t0, model


def touch(model: torch.nn.Module) -> float:
    """Read every weight once (memory-mapped tensors are only read when first used)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum()
    return time.perf_counter() - t0


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="timed forward passes of each kind")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    model_cfg = load_config(CONFIG)["model"]

    with tempfile.TemporaryDirectory(prefix="unet_bench_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        sd = random_state_dict(model_cfg)
        n = sum(v.numel() for v in sd.values())
        print(f"random fp16 state dict: {len(sd)} tensors, {n / 1e9:.3f} G elements, {time.perf_counter() - t0:.1f} s")
        pt, st = tmp / "latentsync_unet.pt", tmp / "latentsync_unet.safetensors"
        t0 = time.perf_counter()
        torch.save({"global_step": 1, "state_dict": sd}, pt)
        print(f"wrote {pt.name} ({pt.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        save_file(sd, str(st))
        print(f"wrote {st.name} ({st.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        del sd
        gc.collect()

        model = None
        for path in (pt, st):
            print(f"\n== {path.name}")
            drop_from_page_cache(path)
            print(f"  read file bytes, cold cache        {read_bytes(path):6.2f} s")
            print(f"  read file bytes, warm cache        {read_bytes(path):6.2f} s")
            drop_from_page_cache(path)
            seconds, model = timed_load(path, torch.float32)
            print(f"  load_unet -> fp32, cold cache      {seconds:6.2f} s")
            del model
            gc.collect()
            seconds, model = timed_load(path, torch.float32)
            print(f"  load_unet -> fp32, warm cache      {seconds:6.2f} s")
            del model
            gc.collect()
            seconds, model = timed_load(path, torch.float16)
            touched = touch(model)
            print(f"  load_unet -> fp16 (file dtype)     {seconds:6.2f} s  (+ {touched:.2f} s reading each weight)")
            del model
            gc.collect()
        print(f"\npeak RSS so far {rss_gb():.1f} GB")

        if args.skip_forward:
            return
        _, model = timed_load(st, torch.float32)
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 13, 16, 32, 32, generator=g)
        audio = torch.randn(16, 50, model_cfg["cross_attention_dim"], generator=g)
        t = torch.tensor(951)
        print(f"\n== fp32 forward, sample {tuple(sample.shape)}, audio {tuple(audio.shape)}")
        cache = DeepCache()
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                full = model(sample, t, audio, cache=cache).sample
                print(f"  full pass (fills the DeepCache)    {time.perf_counter() - t0:6.2f} s")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                shallow = model(sample, torch.tensor(901), audio, cache=cache, shallow=True).sample
                print(f"  DeepCache shallow pass             {time.perf_counter() - t0:6.2f} s")
        print(f"  outputs finite: {bool(torch.isfinite(full).all() and torch.isfinite(shallow).all())}")
        print(f"peak RSS {rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
