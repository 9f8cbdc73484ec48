"""Handing tensors from one stage's CUDA stream to the next.

On a GPU every stage runs on a long-lived thread of its own whose current stream is its own
(``devices.StageThreads``: align and paste at high priority, the U-Net in the middle, scoring at the lowest): a
host copy in one stage (which synchronises its stream) then waits only for that stage's kernels, not for the
U-Net steps another stage has queued. Tensors handed from one stage to the next carry an event recorded after the
kernels that made them, on the stage's own device and stream.
"""
from __future__ import annotations

import torch


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
