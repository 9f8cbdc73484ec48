"""Every run option, its default and its valid range, written once; validated once, in :class:`RunOptions`.

The CLI, ``predict.py`` (whose Cog inputs must be literals: a test keeps them equal to these) and the batch runner
all build a ``RunOptions``, so a bad value gets the same message whatever the front door. No torch here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentsync.errors import InputError

VERSIONS = ("1.5", "1.6")
DEFAULT_VERSION = "1.6"
LOOP_MODES = ("bounce", "loop", "cut_off", "silence")
FACE_SELECTS = ("largest", "active_speaker")
DTYPES = ("fp32", "fp16", "bf16")

GUIDANCE_SCALE = 1.5  # upstream's documented default (its CLI's 1.0 silently turns guidance off)
GUIDANCE_RANGE = (1.0, 3.0)  # 1.0 = no guidance; beyond 3 the mouth over-articulates and artefacts grow
SAMPLERS = ("ddim", "dpmpp_2m", "unipc")  # diffusers' DDIM (upstream's), DPM-Solver++(2M), UniPC
SAMPLER = "ddim"
# Each sampler's step count when ``inference_steps`` is None. The multistep solvers are second order: half DDIM's
# steps is their usual operating point (their quality on the official weights is not checked here).
SAMPLER_STEPS = {"ddim": 20, "dpmpp_2m": 10, "unipc": 10}
INFERENCE_STEPS = SAMPLER_STEPS[SAMPLER]  # upstream's
STEPS_RANGE = (1, 100)  # DDIM gains nothing visible past 50; 1–9 are for tests and previews
GUIDANCE_UNTIL = 1.0  # guidance at every step, as upstream
GUIDANCE_UNTIL_RANGE = (0.0, 1.0)  # fractions of the steps; 0 guides none, as guidance_scale 1.0 does
SEED_RANGE = (0, 2**32 - 1)  # what torch.Generator.manual_seed takes without wrapping
OUTPUT_FPS = 25.0  # upstream's processing and output rate, unless keep_fps
LOOP_MODE = "bounce"
FACE_SELECT = "largest"
DEEPCACHE = True
KEEP_FPS = False


@dataclass(frozen=True)
class RunOptions:
    """What one lip-sync run may vary; construction validates every field (``InputError`` naming the field)."""

    guidance_scale: float = GUIDANCE_SCALE
    inference_steps: int | None = None  # None: the sampler's own count (SAMPLER_STEPS); read it as ``steps``
    sampler: str = SAMPLER
    # Guidance at the steps of index < ceil(guidance_until × steps) only, the U-Net's batch halved after them;
    # 1.0: every step.
    guidance_until: float = GUIDANCE_UNTIL
    seed: int | None = None  # None: a random seed, reported in the result; 0 is an ordinary seed
    loop_mode: str = LOOP_MODE
    deepcache: bool = DEEPCACHE
    keep_fps: bool = KEEP_FPS
    face_point: tuple[float, float] | None = None  # (x, y) in source pixels: edit the face nearest to it
    face_select: str = FACE_SELECT
    # Seconds of the output to lip-sync, sorted and merged; empty: the whole video. A string in the CLI's syntax
    # ("12.5-18,40-42.2", also MM:SS.s and HH:MM:SS.s) or (start, stop) pairs.
    ranges: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        lo, hi = GUIDANCE_RANGE
        g = _number("guidance_scale", self.guidance_scale)
        if not lo <= g <= hi:
            raise InputError(f"guidance_scale must be between {lo:g} and {hi:g} (1.0 = no guidance), got {g:g}")
        object.__setattr__(self, "guidance_scale", g)
        if self.inference_steps is not None:
            object.__setattr__(self, "inference_steps", _integer("inference_steps", self.inference_steps, STEPS_RANGE))
        _choice("sampler", self.sampler, SAMPLERS)
        lo, hi = GUIDANCE_UNTIL_RANGE
        until = _number("guidance_until", self.guidance_until)
        if not lo <= until <= hi:
            raise InputError(f"guidance_until must be a fraction of the steps between {lo:g} and {hi:g} (1.0 = every "
                             f"step), got {until:g}")
        object.__setattr__(self, "guidance_until", until)
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, SEED_RANGE))
        _choice("loop_mode", self.loop_mode, LOOP_MODES)
        _choice("face_select", self.face_select, FACE_SELECTS)
        for name in ("deepcache", "keep_fps"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.face_point is not None:
            point = self.face_point
            if isinstance(point, (str, bytes)) or not hasattr(point, "__len__") or len(point) != 2:
                raise InputError(f"face_point must be two numbers (x, y) in pixels, got {point!r}")
            object.__setattr__(self, "face_point", tuple(_number("face_point", v) for v in point))
        object.__setattr__(self, "ranges", parse_ranges(self.ranges))

    @property
    def steps(self) -> int:
        """The denoising steps a run takes: ``inference_steps``, else the sampler's own count."""
        return SAMPLER_STEPS[self.sampler] if self.inference_steps is None else self.inference_steps

    @property
    def guided_steps(self) -> int:
        """How many of the first steps are guided: ``ceil(guidance_until × steps)`` (a product within 1e-9 of a whole
        number counts as that number: 0.3 × 10 is 3 steps); 0 without guidance (``guidance_scale`` 1.0)."""
        if self.guidance_scale <= 1.0:
            return 0
        return math.ceil(self.guidance_until * self.steps - 1e-9)

    @classmethod
    def make(cls, options: RunOptions | dict[str, Any] | None = None, **overrides: Any) -> RunOptions:
        """Options from an existing object or a dict, with keyword overrides; unknown names are an ``InputError``."""
        if options is not None and not isinstance(options, (RunOptions, Mapping)):
            raise InputError(f"options must be a RunOptions or a dict of option names, got {options!r}")
        base = dataclasses.asdict(options) if isinstance(options, RunOptions) else dict(options or {})
        base.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise InputError(f"unknown option {unknown[0]!r}; the options are {', '.join(sorted(known))}")
        return cls(**base)

    def with_seed(self) -> RunOptions:
        """These options with a concrete seed: the given one, else a fresh random one."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=random.randint(*SEED_RANGE))


def parse_ranges(value: Any) -> tuple[tuple[float, float], ...]:
    """Time ranges in seconds from ``"12.5-18,1:40-1:42.2"`` (or (start, stop) pairs), sorted, overlaps merged;
    ``""``/None/empty: ``()``, the whole video. An unparsable or empty range is an ``InputError`` naming it."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [] if not value.strip() else value.split(",")
        pairs: list[tuple[float, float]] = []
        for item in items:
            if not item.strip():
                raise InputError(f"ranges {value!r} has an empty range (two commas in a row, or one at an end)")
            start_text, sep, stop_text = item.strip().partition("-")
            if not sep:
                raise InputError(f"range {item.strip()!r} must be START-STOP (seconds, MM:SS.s or HH:MM:SS.s)")
            pairs.append((_clock_time(item, start_text), _clock_time(item, stop_text)))
    elif hasattr(value, "__iter__") and not isinstance(value, bytes):
        pairs = []
        for item in value:
            if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
                raise InputError(f"range {item!r} must be a (start, stop) pair of seconds")
            pairs.append((_number("range start", item[0]), _number("range stop", item[1])))
    else:
        raise InputError(f"ranges must be a string like '12.5-18,40-42.2' or (start, stop) pairs, got {value!r}")
    merged: list[tuple[float, float]] = []
    for start, stop in sorted(pairs):
        if start < 0 or stop <= start:
            raise InputError(f"range {start:g}-{stop:g} is empty or negative: give START-STOP with START < STOP")
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return tuple(merged)


def _clock_time(item: str, text: str) -> float:
    """Seconds of ``12.5``, ``MM:SS.s`` or ``HH:MM:SS.s``; an ``InputError`` naming the range ``item`` if not."""
    parts = text.strip().split(":")
    try:
        if len(parts) > 3 or any(not p.strip() or p.strip().startswith(("+", "-")) for p in parts):
            raise ValueError
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"range {item.strip()!r}: {text.strip()!r} is not a time (seconds, MM:SS.s or "
                         "HH:MM:SS.s)") from None
    if any(not p.strip().isdigit() for p in parts[:-1]):  # 1.5:30 is not 1 min 30 s nor 90 + 30 s
        raise InputError(f"range {item.strip()!r}: {text.strip()!r} is not a time: in MM:SS.s and HH:MM:SS.s the "
                         "hours and minutes are whole numbers")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    if not math.isfinite(seconds) or any(v >= 60 for v in values[1:]):
        raise InputError(f"range {item.strip()!r}: {text.strip()!r} is not a time (seconds, MM:SS.s or HH:MM:SS.s)")
    return seconds


def check_version(version: str, name: str = "version", also: tuple[str, ...] = ()) -> str:
    """A known LatentSync version string (or one of ``also``), else an ``InputError`` naming ``name`` (a flag, a
    variable, a manifest line) and listing the versions. The one version check of every front door."""
    version = str(version).strip()
    _choice(name, version, VERSIONS + tuple(also))
    return version


def check_file(name: str, path: str | os.PathLike[str]) -> Path:
    """An existing, non-empty file given by the user (a config, an input, a jobs file), else an ``InputError``
    naming it. The one "file exists" check."""
    path = Path(path)
    if not path.is_file():
        what = ("is a folder, not a file" if path.is_dir() else
                "is not a regular file (a pipe, a device or a socket); give a file" if path.exists() else
                "does not exist")
        raise InputError(f"{name} {path} {what}")
    if path.stat().st_size == 0:
        raise InputError(f"{name} {path} is empty (0 bytes)")
    return path


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


def _integer(name: str, value: Any, bounds: tuple[int, int]) -> int:
    number = _number(name, value)
    if number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    lo, hi = bounds
    if not lo <= number <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {int(number)}")
    return int(number)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
