"""Rendering a plan: output chunks through the synthesis stages into a silent H.264 part, and the finishing
join, mux and sync score of the parts.

For each 16-frame chunk of the output: fetch and align its frames (``stages.align``), VAE-encode, denoise,
decode (``stages.generate``), paste back and encode (``stages.paste``), score the sync of sampled spans
(``stages.score``); the stages run concurrently in threads joined by bounded queues (``stages``). Rendering is
split into chunk ranges so that several workers can render parts of one video. With time ranges, a chunk that
touches none passes its source frames through (read and encoded only), its random draws still taken.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from latentsync import video as video_mod
from latentsync.context import RunContext
from latentsync.control import StageClock
from latentsync.errors import InputError
from latentsync.length import OpenPlan
from latentsync.models.syncnet import VIDEO_FPS, WINDOW_FRAMES
from latentsync.plan import Plan, RenderPart
from latentsync.progress import ENCODING, SCORING, SYNTHESIS
from latentsync.result import LipSyncResult
from latentsync.stages import run_stages
from latentsync.stages.align import AlignStage
from latentsync.stages.generate import GenerateStage
from latentsync.stages.paste import PasteStage
from latentsync.stages.score import ScoreStage, scores_while_rendering
from latentsync.syncscore import combine_scores, score_span, syncnet_on
from latentsync.timeline import Chunk, chunk_at
from latentsync.video.join import join_parts

log = logging.getLogger(__name__)


def render_part(plan: Plan | OpenPlan, out_path: Path, chunks: range | None, run: RunContext) -> RenderPart:
    """Write output chunks ``chunks`` (default: all) of ``plan`` as a silent H.264 file ``out_path``; an open plan
    (its pass 1 still running) tracks the frames each chunk shows first. The run's progress counts the frames
    written."""
    chunks = range(plan.num_chunks) if chunks is None else chunks
    models, progress, cancel = run.models, run.progress, run.cancel
    if chunks.step != 1 or not 0 <= chunks.start < chunks.stop <= plan.num_chunks:
        raise ValueError(f"chunks must be a non-empty range within 0..{plan.num_chunks}, got {chunks}")
    clock = StageClock()
    size = plan.chunk_size
    covered = range(chunks.start * size, min(chunks.stop * size, plan.num_out))
    # The stages' face source: the plan's matrices, or the open plan's growing track.
    faces = plan.track if isinstance(plan, OpenPlan) else plan

    def source() -> Iterator[Chunk]:
        # A pending length (cut_off, silence) ends where pass 1 says, not at ``chunks`` (counted from an estimate).
        pending = isinstance(plan, OpenPlan) and plan.pending is not None
        c = chunks.start
        while pending or c < chunks.stop:
            # An open plan tracks what the chunk shows (the track's clock is the plan's: its seconds count there)
            # and, with a pending length, waits until the chunk is certain; None: past the output's end.
            chunk = plan.chunk(c)
            if chunk is None:
                return
            if (not chunk.weight or any(chunk.weight)) and min(chunk.src) < plan.face_start:
                raise InputError(f"{plan.video} has fewer frames than its container says, so the ranges reach "
                                 "frames repeated from its start; re-encode the video, or run without ranges")
            yield chunk
            c += 1

    with torch.inference_mode():
        generate = GenerateStage(plan, plan.fps, plan.options, models, clock, cancel=cancel)
        if isinstance(plan, Plan):  # an open plan renders from its first chunk
            for c in range(chunks.start):
                generate.skip(chunk_at(c, size, plan.num_out, plan.order, plan.has_face))
    align = AlignStage(plan, faces, models, clock)
    writer = None
    try:  # everything that starts a process or a bar is made inside: an interrupt at any line cleans up
        writer = video_mod.VideoWriter(out_path, plan.fps, plan.info.width, plan.info.height)
        progress.start(SYNTHESIS, len(covered))
        paste = PasteStage(plan, faces, models, clock, writer, progress, tap=run.tap)
        # SyncNet scores while the other stages work where it lives on the run's device; else in ``finish_run``.
        score = ScoreStage(plan, models, clock, covered, score_now=scores_while_rendering(models))
        # Every stage runs on its long-lived thread of the models (cuDNN's plans are per thread), on its stream.
        threads = models.threads
        run_stages(source(), [align, generate, paste, score], concurrent=not run.serial, cancel=cancel,
                   homes=dict(enumerate([threads.align, threads.generate, threads.paste, threads.score])))
        with clock("encode"):
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        progress.end(SYNTHESIS, failed=True)
        raise
    finally:
        progress.end(SYNTHESIS)  # after a failure: already ended
        align.close()
    return RenderPart(path=Path(out_path), chunks=chunks, frames=len(covered), seconds=clock.seconds,
                      sync_scores=score.scores, sync_crops=score.crops)


def finish_run(plan: Plan, rendered: list[RenderPart], output: Path, run: RunContext) -> LipSyncResult:
    """Join the ``rendered`` parts (in chunk order), mux the user's audio into ``output``, score the sync."""
    output = Path(output)
    clock = StageClock()
    models, progress = run.models, run.progress
    with progress.stage(ENCODING), tempfile.TemporaryDirectory(prefix="latentsync-") as tmp:
        silent = rendered[0].path
        if len(rendered) > 1:
            with clock("join"):
                silent = join_parts([part.path for part in rendered], Path(tmp) / "joined.mp4")
        with clock("mux"):
            video_mod.mux_audio(silent, plan.audio, output, duration=plan.num_out / plan.fps)
    scores = {span: s for part in rendered for span, s in part.sync_scores.items()}
    todo = [span for span in plan.sync_spans if span not in scores]
    if todo:
        crops = {j: c for part in rendered for j, c in part.sync_crops.items()}
        with progress.stage(SCORING), clock("sync"), syncnet_on(models.syncnet, models.device) as syncnet:
            assert syncnet is not None  # a plan lists sync spans only when SyncNet is loaded
            scores.update((span, score_span(syncnet, span, crops, plan.wav, plan.fps)) for span in todo)
    scored = [s for s in (scores[span] for span in plan.sync_spans) if s is not None]
    if models.syncnet is not None and not scored:
        log.info("output too short to score its sync (SyncNet needs %d frames at %g fps)", WINDOW_FRAMES, VIDEO_FPS)
    sync = combine_scores(scored) if scored else None
    seconds: dict[str, float] = {}
    for part_seconds in [plan.seconds, *(r.seconds for r in rendered), clock.seconds]:
        for k, v in part_seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    seed = plan.options.seed
    assert seed is not None  # a plan's options carry the run's seed (RunOptions.with_seed)
    return LipSyncResult(output=output, seed=seed, frames=plan.num_out,
                         frames_with_face=plan.frames_with_face, fps=plan.fps,
                         seconds={k: round(v, 3) for k, v in seconds.items()}, sync=sync, ranges=plan.ranges)
