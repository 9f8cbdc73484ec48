"""Active-speaker search: which of several faces in the first seconds moves its mouth with the video's own audio."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from latentsync import audio as audio_mod
from latentsync import media, syncscore
from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.errors import InputError
from latentsync.face import FaceTracker, make_detector
from latentsync.models.syncnet import VIDEO_FPS, WINDOW_FRAMES, StableSyncNet

log = logging.getLogger(__name__)

ACTIVE_SPEAKER_SECONDS = 5.0  # how much of the video the speaker is chosen on


def active_speaker_point(syncnet: StableSyncNet | None, video: Path, fps: float, info: video_mod.VideoInfo,
                         max_duration: float = media.MAX_DURATION_S) -> tuple[float, float] | None:
    """Score every face of the first seconds against the video's own audio; the speaker's box centre.

    None (edit the largest face) when there is one face, no soundtrack, or too few frames to compare.
    ``max_duration`` is the deployment's cap, already applied to the video by its probe.
    """
    if syncnet is None:
        raise InputError("face_select='active_speaker' needs stable_syncnet.pt in the weights folder")
    if not info.has_audio:
        log.warning("%s has no audio track to find the speaker by; editing the largest face", video)
        return None
    wav = audio_mod.load_audio(video, max_duration=max_duration)
    landmarker = make_detector()
    trackers: list[FaceTracker] = []
    aligners: list[FaceAligner] = []
    tracks: list[list[np.ndarray]] = []
    first_boxes: list[tuple[float, float]] = []
    skipped = 0
    frames = video_mod.read_frames(video, fps, count=int(round(ACTIVE_SPEAKER_SECONDS * fps)), info=info)
    try:
        for frame in frames:
            if not trackers:
                faces = landmarker.detect(frame)
                if not faces:
                    skipped += 1
                    continue
                if len(faces) == 1:
                    log.info("active speaker: one face in %s, nothing to choose", video)
                    return None
                for face in faces:
                    centre = ((face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2)
                    trackers.append(FaceTracker(landmarker=landmarker, point=centre))
                    aligners.append(FaceAligner(syncscore.RESOLUTION))
                    tracks.append([])
                    first_boxes.append(centre)
            for tracker, aligner, track in zip(trackers, aligners, tracks, strict=True):  # the three grow together
                tracked = tracker.track(frame)
                if tracked is None:
                    aligner.reset()
                    if track:  # a missing frame repeats the last crop, so every track covers the same frames
                        track.append(track[-1])
                    continue
                crop, _ = aligner.align(frame, tracked.anchors)
                track.append(crop)
    finally:
        frames.close()
        landmarker.close()
    if not trackers:
        return None
    # Every track ends on the last frame read; keep the span they all cover.
    total = max(len(t) for t in tracks)
    n = min(len(t) for t in tracks)
    clips = [np.stack(t[len(t) - n:]) for t in tracks]
    del tracks  # its crops are copied into clips: not held twice
    if n < WINDOW_FRAMES * fps / VIDEO_FPS:
        log.warning("active speaker: too few frames with every face to compare; editing the largest face")
        return None
    first = skipped + total - n
    wav = wav[int(round(first / fps * audio_mod.SAMPLE_RATE)):]
    best = syncscore.choose_active_speaker(clips, wav, syncscore.SyncScorer(syncnet, fps=fps))
    return first_boxes[best]
