"""CUDA streams per stage.

On a GPU every stage thread queues its work on a stream of its own: a host copy in one stage (which synchronises
its stream) then waits only for that stage's kernels, not for the U-Net steps another stage has queued. Tensors
handed from one stage to the next carry an event recorded after the kernels that made them, on the stage's own
device (a thread's current device is cuda:0 unless it was switched: an event recorded there marks nothing).

The align and paste streams run at high priority: their few small kernels then start between the U-Net's, so the
frames keep flowing while the GPU is busy denoising. Sync scoring, needed only at the end, runs at low priority.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

HIGH, LOW = -1, 0  # CUDA stream priorities: lower numbers run first; 0 is the default and the lowest


def own_stream(device: torch.device, priority: int = LOW) -> torch.cuda.Stream | None:
    """A new CUDA stream on ``device`` with ``priority`` (``HIGH`` or ``LOW``); None elsewhere (the CPU needs none)."""
    return torch.cuda.Stream(device, priority=priority) if device.type == "cuda" else None


def on_stream(stream: torch.cuda.Stream | None):
    """Context that makes ``stream`` current in this thread (nothing when None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def made(device: torch.device) -> torch.cuda.Event | None:
    """An event marking the work queued so far on this thread's current stream of ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def take(tensor: torch.Tensor | None, ready: torch.cuda.Event | None) -> None:
    """Let this thread's current stream use ``tensor`` made on another stream: wait for it on the device, and
    keep its memory from being reused before this stream is done with it."""
    if ready is None or tensor is None:
        return
    stream = torch.cuda.current_stream(tensor.device)
    stream.wait_event(ready)
    tensor.record_stream(stream)
