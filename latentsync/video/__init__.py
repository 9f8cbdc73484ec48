"""Video in and out through ffmpeg subprocesses, one frame at a time: ``probe``, ``read`` and ``write``, with
``frames``, ``join`` and ``check`` built on them.

``probe`` checks a user's video before any work (format, size and duration caps); ``read_frames`` streams RGB
frames at a constant processing rate from any frame index, and ``frames.FrameFetcher`` serves them by index;
``VideoWriter`` streams RGB frames into H.264; ``join.join_parts`` concatenates our own rendered parts;
``mux_audio`` puts the user's own audio beside the finished video; ``check.is_complete`` tells a finished output
from a cut-off one. Every ffmpeg call (and PyAV probe) that opens a user file is confined by ``media`` and given a
``file:`` URL, so playlists and other protocols are refused and odd file names (spaces, quotes, ``$(…)``, a leading
``-``) are plain names.
"""
from latentsync.video.probe import VideoInfo, probe
from latentsync.video.read import expected_frames, read_frames
from latentsync.video.write import OUTPUT_CONTAINERS, VideoWriter, check_output_container, mux_audio

__all__ = ["OUTPUT_CONTAINERS", "VideoInfo", "VideoWriter", "check_output_container", "expected_frames", "mux_audio",
           "probe", "read_frames"]
