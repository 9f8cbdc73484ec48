"""Which torch device and dtype a run uses (a device or dtype the machine cannot give is an ``InputError``), the
one thread that queues a ``LipSync``'s GPU work, and the CUDA allocator setting of every front door."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from latentsync.errors import InputError
from latentsync.hardware import DEVICE_HELP, NO_CUDA_BUILD, NO_CUDA_GPU, NO_MPS
from latentsync.hardware import USE_CPU as _USE_CPU
from latentsync.options import DTYPES

_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the caller names one; a name torch does not know, or a CUDA/MPS device
    this machine lacks, is an ``InputError`` (one line) rather than torch's traceback at the first tensor."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):  # torch's message lists two dozen internal device types
            raise InputError(f"unknown device {str(device)!r}; {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = NO_CUDA_GPU if torch.backends.cuda.is_built() else NO_CUDA_BUILD
            raise InputError(f"device {str(device)!r} asked for, but {why}; {_USE_CPU}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s): "
                             f"cuda:0 … cuda:{count - 1}")
        if dev.index is None:  # what a CUDA tensor's .device says, and what torch.cuda.set_device accepts
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {str(device)!r} asked for, but {NO_MPS}; {_USE_CPU}")
    elif dev.type != "cpu":
        raise InputError(f"device {str(device)!r} is not supported; {DEVICE_HELP}")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Upstream's rule: fp16 on CUDA sm_80+, fp32 elsewhere; ``"bf16"``/``"fp16"``/``"fp32"`` or a dtype override it."""
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name not in _DTYPE_NAMES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return _DTYPE_NAMES[name]
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise InputError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.float16
    return torch.float32


# Frames per VAE call on a GPU. The decode of a 16-frame chunk holds ~6.4 GiB of activations at 512 px (1.6 GiB at
# 256): slices of 4 (512) and 8 (256) frames keep it near 1.6 and 0.8 GiB.
VAE_SLICE_PIXELS, VAE_SLICE_MAX = 4 * 512 * 512, 8


def vae_slice(device: torch.device, resolution: int) -> int | None:
    """Frames per VAE encode/decode call (None: the whole batch at once), fixed per device type and resolution.

    The CPU keeps whole batches: its memory is the host's, and its convolutions round differently by batch size
    (oneDNN picks its kernels by shape), so slicing there would change the frames a CPU run has always made.
    """
    if device.type != "cuda":
        return None
    return max(1, min(VAE_SLICE_MAX, VAE_SLICE_PIXELS // (resolution * resolution)))


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``. To a GPU it goes through pinned memory without blocking: a copy from
    pageable memory first waits for all the work queued on the stream, which would stall the thread queueing it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def pick_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor[rows]`` for a list of row numbers, without the index upload: indexing a device tensor with a Python
    list first copies the list to the device, blocking; the rows as views, stacked, need no copy at all."""
    if not rows:
        return tensor[:0]
    if rows == list(range(rows[0], rows[-1] + 1)):  # consecutive: a plain slice
        return tensor[rows[0]:rows[-1] + 1]
    return torch.stack([tensor[k] for k in rows])


class Staging:
    """Host→device copies of one thread through two reused pinned buffers: several arrays go up in one copy that
    does not block, and a buffer is refilled only once the copy out of it is done (its event).

    Pinned memory is slow to allocate and a copy from pageable memory waits for the stream, so a chunk's windows,
    matrices or draws are packed into a buffer made once and grown as needed. Off CUDA each array is a CPU tensor
    as it was (no copy, the same bytes).
    """

    _ALIGN = 64  # bytes: every array starts where any dtype's view may start

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[torch.Tensor] = []
        self._done: list[Any] = []  # per buffer, the event after the last copy out of it (None: free)
        self._next = 0

    def upload(self, arrays: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Each array (numpy or CPU tensor) as a tensor on the device, all in one copy; same shapes and dtypes."""
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in arrays]
        if self.device.type != "cuda":
            return [t.to(self.device) for t in tensors]
        spans, total = [], 0
        for t in tensors:
            size = t.numel() * t.element_size()
            spans.append((total, size))
            total += -(-size // self._ALIGN) * self._ALIGN
        k = self._next
        self._next = (k + 1) % 2
        if len(self._buffers) < 2:
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
            self._done.append(None)
        if self._done[k] is not None:
            self._done[k].synchronize()  # the copy out of this buffer two calls ago has finished
        if self._buffers[k].numel() < total:
            self._buffers[k] = torch.empty(max(total, 2 * self._buffers[k].numel()), dtype=torch.uint8).pin_memory()
        host = self._buffers[k]
        for t, (start, size) in zip(tensors, spans, strict=True):
            host[start:start + size].view(t.dtype).view(t.shape).copy_(t)
        dev = torch.empty(total, dtype=torch.uint8, device=self.device)
        dev.copy_(host[:total], non_blocking=True)
        self._done[k] = torch.cuda.Event()
        self._done[k].record(torch.cuda.current_stream(self.device))
        return [dev[start:start + size].view(t.dtype).view(t.shape)
                for t, (start, size) in zip(tensors, spans, strict=True)]


def use_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let CUDA's caching allocator grow segments in place (less fragmentation across videos of different lengths),
    unless the user set the allocator up; front doors call this before torch first touches CUDA."""
    environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


# CUDA stream priorities (lower numbers are served first; torch keeps pools for 0, -1, -2 and -3): align and paste
# above the U-Net, so their few small kernels start between its steps and frames keep flowing; scoring, needed
# only at the end, below it on the lowest priority.
HIGH, MID, LOW = -2, -1, 0


class GpuThread:
    """One long-lived thread (per ``LipSync`` and stage) that queues a stage's device work on a stream of its own.

    cuDNN keeps its convolution plans per thread, so a fresh thread per video would plan again every run. The
    thread makes ``device`` current once, makes its stream (``priority``) current, and runs everything in
    inference mode. ``close()`` stops it; a later ``submit`` starts a new one.
    """

    def __init__(self, device: torch.device, name: str = "gpu", priority: int = MID):
        self.device, self.name, self.priority = device, name, priority
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._stream: Any = None

    @property
    def stream(self) -> Any:
        """The thread's CUDA stream (None off CUDA), made on first use."""
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device, priority=self.priority)
        return self._stream

    def _start(self) -> None:
        self._ident = threading.get_ident()
        if self.device.type == "cuda":  # without this the thread's current device is cuda:0 whatever ``device`` is
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.stream)  # per thread: every kernel this thread queues goes there

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)`` on the thread, under inference mode."""
        def call() -> Any:
            with torch.inference_mode():
                return fn(*args, **kwargs)

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"latentsync-{self.name}",
                                                initializer=self._start)
            return self._pool.submit(call)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the thread; waits and returns its result (or raises its error)."""
        if threading.get_ident() == self._ident:  # already on it: queueing would wait for itself
            with torch.inference_mode():
                return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Stop the thread once its queued work is done."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


@dataclass(frozen=True)
class StageThreads:
    """The long-lived threads of a ``LipSync``'s stages: align and paste at high priority, generate (and Whisper,
    warm-up) in the middle, scoring at the lowest."""

    align: GpuThread
    generate: GpuThread
    paste: GpuThread
    score: GpuThread

    @classmethod
    def on(cls, device: torch.device) -> StageThreads:
        return cls(GpuThread(device, "align", HIGH), GpuThread(device, "gpu", MID), GpuThread(device, "paste", HIGH),
                   GpuThread(device, "score", LOW))

    def close(self) -> None:
        """Stop every thread (a later run starts them again)."""
        for thread in (self.align, self.generate, self.paste, self.score):
            thread.close()


def make_deterministic(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask CUDA for run-to-run identical kernels where torch allows it: cuDNN's deterministic algorithms without
    autotuning, and cuBLAS's fixed workspace (read when cuBLAS starts, so before any model loads). For parts of
    one video rendered by different workers: with the same GPU model and software stack they then join seamlessly."""
    environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
