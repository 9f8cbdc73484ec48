"""Peak host memory of the CLI by video length (tiny random models, 360p, CPU): the flat-memory rule.

    .venv/bin/python benchmarks/memory_bench.py                  # 10 s, 60 s and 300 s, cut_off and bounce
    .venv/bin/python benchmarks/memory_bench.py --seconds 10 60 --loop-modes bounce --repeat 3

Each length runs ``python -m latentsync`` in a fresh process and reads the peak resident memory of that child
(``ru_maxrss`` of the waited-for process), per loop mode (``cut_off`` settles its length on the way; ``bounce``,
the default, scores the sync while it renders). The rule: 10 s within 1.4 GB, 60 s within 5 % of 10 s, in every
run. On a small machine, ``MALLOC_ARENA_MAX=128 OMP_NUM_THREADS=16`` give the CLI a 16-core machine's malloc
arenas and torch threads.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(HERE)]  # this checkout first

from pipeline_bench import make_clip, make_speech  # noqa: E402


def peak_rss_mb(argv: list[str], env: dict) -> tuple[float, float]:
    """Run ``argv`` to the end in a child; its peak RSS in MB and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the CLI failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, nargs="*", default=[10.0, 60.0, 300.0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--loop-modes", nargs="*", default=["cut_off", "bounce"])
    p.add_argument("--repeat", type=int, default=1, help="runs of each length and mode (the worst ratio counts)")
    args = p.parse_args()
    from tiny_weights import make_tiny_weights, manifest_for

    with tempfile.TemporaryDirectory(prefix="latentsync-membench-") as tmp:
        tmp = Path(tmp)
        weights, cfg = make_tiny_weights(tmp / "weights")
        manifest = manifest_for(weights, tmp / "weights.txt")
        env = dict(os.environ, PYTHONPATH=str(ROOT), LATENTSYNC_MANIFEST=str(manifest))
        clips = {seconds: (make_clip(tmp / f"v{seconds:g}.mp4", seconds, args.width, args.height),
                           make_speech(tmp / f"a{seconds:g}.wav", seconds)) for seconds in args.seconds}
        for mode in args.loop_modes:
            worst: dict[float, float] = {}
            for run in range(args.repeat):
                peaks = {}
                for seconds, (clip, audio) in clips.items():
                    out = tmp / f"o-{mode}-{run}-{seconds:g}.mp4"  # a new name each run: the CLI replaces none
                    argv = [sys.executable, "-m", "latentsync", str(clip), str(audio), "-o", str(out),
                            "--weights-dir", str(weights), "--unet-config", str(cfg),
                            "--syncnet-config", str(weights / "syncnet.yaml"), "--device", "cpu", "--seed", "0",
                            "--inference-steps", str(args.steps), "--loop-mode", mode, "-q"]
                    peaks[seconds], wall = peak_rss_mb(argv, env)
                    out.unlink()
                    print(f"{mode} {args.height}p {seconds:g} s: peak RSS {peaks[seconds]:.0f} MB (wall {wall:.0f} s)",
                          flush=True)
                first = min(peaks)
                for seconds, peak in sorted(peaks.items()):
                    if seconds != first:
                        ratio = peak / peaks[first]
                        worst[seconds] = max(worst.get(seconds, 0.0), ratio)
                        print(f"  {mode} run {run + 1}: peak RSS {seconds:g} s / {first:g} s = {ratio:.3f}")
            for seconds, ratio in sorted(worst.items()):
                print(f"{mode}: worst peak RSS {seconds:g} s / {min(args.seconds):g} s over {args.repeat} runs = "
                      f"{ratio:.3f} (rule: at most 1.05)")


if __name__ == "__main__":
    main()
