"""U-Net cost of one 16-frame chunk for each sampler, late-guidance and DeepCache setting, modelled and measured.

For ddim 20, dpmpp_2m 10 and unipc 10 steps, each with ``guidance_until`` 1.0 and 0.5 and DeepCache on and off:

* the U-Net calls of one chunk by kind (full or DeepCache-shallow, batch 2 = guided, batch 1 = not), counted by
  running ``latentsync.sampling.denoise`` itself;
* the modelled GPU seconds per output second: each kind of pass weighted by its floating-point operations, counted
  on the full-size 1.6 U-Net at 512 px (on the meta device: no weights, no memory) with torch's ``FlopCounterMode``,
  at an assumed sustained throughput (``--tflops``), 25 output frames a second in 16-frame chunks. No per-pass GPU
  times have been measured for this project yet, so the model assumes a pass's time follows its operations: batch 1
  costs half of batch 2 (at 512 px a 16-frame batch fills the GPU) and a shallow pass 7 % of a full one. Shallow
  passes are memory-bound, so they take more than their operations say: DeepCache settings come out a little
  cheaper here than on a GPU. The VAE and the other stages are the same in every setting and are left out;
* the CPU wall time of the chunk's denoising on the tiny test U-Net (64 px), next to the model.

Ratios are to today's default: ddim, 20 steps, guidance at every step, DeepCache on.

    .venv/bin/python benchmarks/sampler_bench.py [--tflops 400] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from latentsync.config import config_path, load_config  # noqa: E402
from latentsync.loader import load_scheduler  # noqa: E402
from latentsync.models.unet import DeepCache, UNet3DConditionModel  # noqa: E402
from latentsync.options import GUIDANCE_SCALE, OUTPUT_FPS, SAMPLER_STEPS, RunOptions  # noqa: E402
from latentsync.sampling import denoise  # noqa: E402
from latentsync.stages.generate import DEEPCACHE_INTERVAL  # noqa: E402
from tiny_weights import UNET_MODEL  # noqa: E402

FRAMES = 16
KINDS = (("full", 2), ("full", 1), ("shallow", 2), ("shallow", 1))  # (pass, batch)
SETTINGS = [(sampler, until, deepcache) for sampler in SAMPLER_STEPS for until in (1.0, 0.5)
            for deepcache in (True, False)]
TODAY = ("ddim", 1.0, True)


class Counting(torch.nn.Module):
    """A U-Net that counts its calls by (pass, batch)."""

    def __init__(self, unet: UNet3DConditionModel):
        super().__init__()
        self.unet, self.calls = unet, Counter()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x, t, audio, *, cache=None, shallow=False):
        self.calls[("shallow" if shallow else "full", x.shape[0])] += 1
        return self.unet(x, t, audio, cache=cache, shallow=shallow)


def pass_flops() -> dict[tuple[str, int], float]:
    """Operations of each kind of pass of the full-size 1.6 U-Net on a 16-frame chunk at 512 px."""
    cfg = load_config(config_path("unet/stage2_512.yaml"))
    latent = cfg["data"]["resolution"] // 8
    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(cfg["model"]).eval()
    flops = {}
    for batch in (2, 1):
        x = torch.zeros((batch, 13, FRAMES, latent, latent), device="meta")
        audio = torch.zeros((batch * FRAMES, 50, cfg["model"]["cross_attention_dim"]), device="meta")
        t, cache = torch.tensor(500, device="meta"), DeepCache()
        for kind in ("full", "shallow"):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                unet(x, t, audio, cache=cache, shallow=kind == "shallow")
            flops[(kind, batch)] = float(counter.get_total_flops())
    return flops


def chunk_inputs(unet: UNet3DConditionModel):
    g = torch.Generator().manual_seed(0)
    size = UNET_MODEL["sample_size"]
    lat = lambda c: torch.randn((1, c, FRAMES, size, size), generator=g)  # noqa: E731
    return (lat(4), (lat(1) > 0).float(), lat(4), lat(4),
            torch.randn((FRAMES, 50, UNET_MODEL["cross_attention_dim"]), generator=g))


def run(unet: torch.nn.Module, inputs, sampler: str, until: float, deepcache: bool) -> None:
    options = RunOptions(sampler=sampler, guidance_until=until, deepcache=deepcache)
    denoise(unet, load_scheduler(sampler), *inputs, guidance_scale=GUIDANCE_SCALE, num_inference_steps=options.steps,
            deepcache_interval=DEEPCACHE_INTERVAL if deepcache else 0, guided_steps=options.guided_steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tflops", type=float, default=400.0,
                   help="assumed sustained fp16 throughput of the U-Net, TFLOP/s (an H100's dense peak is 989)")
    p.add_argument("--repeats", type=int, default=3, help="CPU timings per setting; the median is shown")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the CPU timings (default 1: on a busy machine more are far slower)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNet3DConditionModel.from_config(UNET_MODEL).eval()
    with torch.no_grad():
        for param in unet.parameters():  # the zero-initialised output conv would make every step the same
            param.add_(0.05 * torch.randn_like(param))
    inputs = chunk_inputs(unet)
    flops = pass_flops()
    chunks_per_second = OUTPUT_FPS / FRAMES
    rows = {}
    for setting in SETTINGS:
        counting = Counting(unet)
        run(counting, inputs, *setting)
        walls = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            run(unet, inputs, *setting)
            walls.append(time.perf_counter() - t0)
        chunk_flops = sum(flops[kind] * n for kind, n in counting.calls.items())
        rows[setting] = (counting.calls, chunk_flops, statistics.median(walls))
        print(f"measured {setting}", file=sys.stderr, flush=True)
    base_flops, base_wall = rows[TODAY][1], rows[TODAY][2]
    print("per-pass operations, 1.6 U-Net, 16 frames at 512 px: " + ", ".join(
        f"{kind} b{batch} {flops[(kind, batch)] / 1e12:.2f} TFLOP" for kind, batch in KINDS))
    print(f"modelled GPU time at {a.tflops:g} TFLOP/s sustained; CPU: tiny U-Net, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}\n")
    head = ("sampler", "steps", "g_until", "deepcache", "full b2", "full b1", "shal b2", "shal b1",
            "GPU s/out s", "ratio", "CPU ms/chunk", "CPU ratio")
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for (sampler, until, deepcache), (calls, chunk_flops, wall) in rows.items():
        gpu = chunk_flops / (a.tflops * 1e12) * chunks_per_second
        cells = (sampler, str(SAMPLER_STEPS[sampler]), f"{until:g}", "on" if deepcache else "off",
                 *(str(calls.get(kind, 0)) for kind in KINDS), f"{gpu:.3f}", f"{chunk_flops / base_flops:.2f}",
                 f"{wall * 1e3:.0f}", f"{wall / base_wall:.2f}")
        print(" | ".join(cell.rjust(len(h)) for cell, h in zip(cells, head, strict=True)))


if __name__ == "__main__":
    main()
