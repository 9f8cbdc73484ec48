"""latentsync.video: probing, constant-rate streaming decode with exact seeks, encoding, muxing, hostile inputs."""
from __future__ import annotations

import gc
import logging
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from latentsync import InputError, media, video
from latentsync.video import read as video_read
from latentsync.video.probe import exact_rate
from latentsync.video.write import _temp_beside
from media_utils import frame_times, probe_streams

FFMPEG = media.ffmpeg_exe()
REPO = Path(__file__).resolve().parent.parent


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *args], check=True)


def make_clip(path: Path, *, size: str = "160x120", rate: str = "25", seconds: float = 2.0,
              audio: tuple[int, int] | None = (44100, 2), vcodec: list[str] = ("-c:v", "libx264"),
              acodec: list[str] = ("-c:a", "aac"), extra: list[str] = ()) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={rate}:d={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=f=440:r={audio[0]}:d={seconds}", "-ac", str(audio[1]), *acodec]
    ffmpeg(*args, *vcodec, "-pix_fmt", "yuv420p", *extra, str(path))
    return path


def count_frames(path: Path, fps: float | None = None, *, info: video.VideoInfo | None = None) -> int:
    """Exact number of frames ``read_frames(path, fps)`` should yield, counted by ffmpeg on the same decode (the
    same arguments, no conversion to RGB): the oracle the reader is checked against."""
    info = info or video.probe(path)
    rate = exact_rate(fps if fps is not None else info.fps)
    cmd = media.ffmpeg_command("-nostats", *video_read._decode_args(path, info, rate, 0), "-f", "null", "-progress",
                               "pipe:1", "-")
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, check=False, env=media.ffmpeg_env())
    if proc.returncode < 0:
        raise RuntimeError(f"ffmpeg crashed (signal {-proc.returncode}) decoding {path.name!r}")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    frames = [line for line in proc.stdout.decode().splitlines() if line.startswith("frame=")]
    return int(frames[-1].split("=", 1)[1]) if frames else 0


def source_frames(path: Path) -> tuple[list[Fraction], np.ndarray]:
    """Every decoded source frame (no rate conversion) with its exact presentation time."""
    pts = frame_times(path)
    v = next(s for s in probe_streams(path)["streams"] if s["codec_type"] == "video")
    w, h = v["width"], v["height"]
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-vsync", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-sws_flags", "accurate_rnd+full_chroma_int", "-"],
                         check=True, capture_output=True).stdout
    return pts, np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def packet_span(path: Path) -> Fraction:
    """Seconds from the first video packet's pts to the end (pts + duration) of the last, as the file states."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.duration or 0) for p in container.demux(stream) if p.size]
    return (max(pts + length for pts, length in packets) - min(pts for pts, _ in packets)) * stream.time_base


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video")


@pytest.fixture(scope="module")
def mp4(media_dir) -> Path:
    return make_clip(media_dir / "clip.mp4")


@pytest.fixture(scope="module")
def vfr(media_dir) -> Path:
    """Variable rate: 30 fps with ms jitter for 2 s, then 12 fps, with a 2.5 s freeze (4.4 s → 7.0 s) ended by a
    keyframe; B-frames, GOP 12. A seek into the freeze lands, by decode time, on that keyframe, shown too late."""
    expr = "if(lt(N,60),N*1000/30,2000+(N-60)*1000/12)+7*mod(N,3)+gte(N,90)*2500"
    path = media_dir / "vfr.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=160x120:r=30:d=4", "-vf", f"settb=1/1000,setpts='{expr}'",
           "-vsync", "passthrough", "-enc_time_base", "1/1000", "-c:v", "libx264", "-g", "12",
           "-force_key_frames", "expr:eq(n,90)", str(path))
    return path


@pytest.fixture(scope="module")
def long30(media_dir) -> Path:
    """A 30 fps clip long enough that late blocks are read after a real seek (30→25 fps has rounding ties)."""
    return make_clip(media_dir / "long30.mp4", rate="30", seconds=8.0, audio=None, extra=["-g", "30"])


# ---------------------------------------------------------------------------------------------------- probe


def test_probe_mp4(mp4):
    info = video.probe(mp4)
    assert (info.width, info.height, info.rotation) == (160, 120, 0)
    assert info.fps == 25 and info.frame_count == 50 and info.duration == pytest.approx(2.0, abs=0.05)
    assert (info.has_audio, info.audio_sample_rate, info.audio_channels) == (True, 44100, 2)
    assert "mp4" in info.format_name.split(",")


def test_probe_webm_estimates_frame_count(media_dir):
    path = make_clip(media_dir / "clip.webm", size="176x144", rate="30", audio=(48000, 1),
                     vcodec=["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"],
                     acodec=["-c:a", "libopus"])
    info = video.probe(path)
    assert (info.width, info.height, info.fps) == (176, 144, 30)
    assert abs(info.frame_count - 60) <= 1  # WebM states no frame count: duration·fps
    assert (info.audio_sample_rate, info.audio_channels) == (48000, 1)
    assert "webm" in info.format_name.split(",")


def test_probe_mov_without_audio(media_dir):
    path = make_clip(media_dir / "clip.mov", size="320x180", rate="24000/1001", audio=None)
    info = video.probe(path)
    assert (info.width, info.height) == (320, 180)
    assert info.fps == pytest.approx(24000 / 1001)
    assert (info.has_audio, info.audio_sample_rate, info.audio_channels) == (False, None, None)
    assert "mov" in info.format_name.split(",")


def test_rotation_metadata_turns_frames(media_dir, mp4):
    rotated = media_dir / "rotated.mp4"
    try:  # ffmpeg >= 6 sets a display matrix with an input option; 5.x muxers took the old rotate tag
        ffmpeg("-display_rotation", "90", "-i", str(mp4), "-c", "copy", str(rotated))
    except subprocess.CalledProcessError:
        ffmpeg("-i", str(mp4), "-c", "copy", "-metadata:s:v", "rotate=90", str(rotated))
    info = video.probe(rotated)
    assert info.rotation in (90, 270) and (info.width, info.height) == (120, 160)
    upright = next(video.read_frames(mp4)).astype(int)
    turned = next(video.read_frames(rotated)).astype(int)
    assert turned.shape == (160, 120, 3)
    right = np.abs(np.rot90(upright, k=info.rotation // 90) - turned).mean()
    wrong = np.abs(np.rot90(upright, k=-info.rotation // 90) - turned).mean()
    assert right < 1.0 and wrong > 20


# ------------------------------------------------------------------------------------------------ decoding


def test_frames_are_rgb_and_faithful(media_dir):
    path = media_dir / "red.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=0xC81E1E:s=64x48:r=25:d=0.4", "-c:v", "libx264", "-crf", "0",
           "-pix_fmt", "yuv444p", str(path))
    frames = list(video.read_frames(path))
    assert len(frames) == 10 and frames[0].dtype == np.uint8 and frames[0].shape == (48, 64, 3)
    assert np.abs(frames[0].astype(int) - [200, 30, 30]).max() <= 2  # RGB order, no colour-matrix shift


def test_vfr_becomes_constant_rate(vfr):
    pts, src = source_frames(vfr)
    out = list(video.read_frames(vfr, 25))
    # Each output frame k is the source frame on screen at slot k: the last one with round(pts·25) <= k.
    slot = [math.floor(p * 25 + Fraction(1, 2)) for p in pts]
    expected = [max(j for j, s in enumerate(slot) if s <= k + slot[0]) for k in range(len(out))]
    assert len(out) == count_frames(vfr, 25)
    # The last frame stays on screen for its own duration too: the output covers first pts → end of last packet.
    assert abs(len(out) - packet_span(vfr) * 25) <= 1  # ≈ 9.4 s at 25 fps, freeze included
    assert expected[-1] >= len(pts) - 2  # ffmpeg's fps filter may end a slot early on the last frame
    assert all(np.array_equal(out[k], src[expected[k]]) for k in range(len(out)))


@pytest.mark.parametrize("clip", ["vfr", "long30"])
def test_start_count_matches_full_read(clip, request):
    path = request.getfixturevalue(clip)
    info = video.probe(path)
    full = list(video.read_frames(path, 25, info=info))
    assert len(full) > 150
    for start in (1, 7, 42, 77, 120, 150, 160, len(full) - 16, len(full) - 5):
        block = list(video.read_frames(path, 25, start=start, count=16, info=info))
        assert len(block) == len(full[start:start + 16]), start
        assert all(np.array_equal(a, b) for a, b in zip(block, full[start:start + 16], strict=True)), start
    assert list(video.read_frames(path, 25, start=len(full) + 3, count=16, info=info)) == []


def test_late_block_is_read_after_a_seek(long30):
    info = video.probe(long30)
    args = video_read._decode_args(long30, info, Fraction(25), 180)  # 7.2 s into the clip
    assert "-ss" in args and float(args[args.index("-ss") + 1]) > 5.0


def test_unseekable_container_reads_blocks_too(media_dir):
    path = make_clip(media_dir / "clip.ts", rate="30", seconds=3.0, audio=None, vcodec=["-c:v", "libx264"])
    full = list(video.read_frames(path, 25))
    block = list(video.read_frames(path, 25, start=50, count=16))
    assert len(block) == 16 and all(np.array_equal(a, b) for a, b in zip(block, full[50:66], strict=True))


def test_source_rate_by_default(media_dir):
    path = make_clip(media_dir / "rate30.mp4", rate="30", seconds=1.0, audio=None)
    assert len(list(video.read_frames(path))) == 30
    assert len(list(video.read_frames(path, 25))) == 25
    assert count_frames(path) == 30


def _spy_popen(monkeypatch) -> list[subprocess.Popen]:
    started = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    return started


def test_closing_early_reaps_ffmpeg(long30, monkeypatch):
    info = video.probe(long30)
    started = _spy_popen(monkeypatch)
    frames = video.read_frames(long30, 25, info=info)
    assert not started  # nothing runs before the first frame is asked for
    next(frames)
    assert len(started) == 1 and started[0].poll() is None
    frames.close()
    assert started[0].returncode is not None


def test_dropping_the_iterator_reaps_ffmpeg(long30, monkeypatch):
    info = video.probe(long30)
    started = _spy_popen(monkeypatch)
    frames = video.read_frames(long30, 25, info=info)
    next(frames)
    del frames
    gc.collect()
    assert started[0].returncode is not None


# ------------------------------------------------------------------------------------------------ encoding


def _gradient(width: int, height: int, shift: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3 + shift) % 256, (y * 3) % 256, ((x + y) * 2 + 3 * shift) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("size, encoded", [((640, 360), (640, 360)), ((641, 361), (642, 362)),
                                           ((320, 241), (320, 242)), ((511, 509), (512, 510))])
def test_writer_gives_every_player_a_420_file(media_dir, size, encoded, caplog):
    """Even sizes are kept; an odd side is padded by one repeated edge pixel (right/bottom), never 4:4:4."""
    width, height = size
    frames = [_gradient(width, height, 5 * i) for i in range(5)]
    out = media_dir / f"size_{width}x{height}.mp4"
    with caplog.at_level(logging.WARNING, logger="latentsync.video"):
        with video.VideoWriter(out, 25, width, height) as writer:
            for frame in frames:
                writer.write(frame)
    assert writer.encoded_size == encoded
    padded = encoded != size
    assert ("odd frame size" in caplog.text) == padded
    if padded:
        assert f"{width}x{height}" in caplog.text and "{}x{}".format(*encoded) in caplog.text
    stream = probe_streams(out)["streams"][0]
    assert (stream["width"], stream["height"], stream["pix_fmt"], stream["codec_name"]) == (*encoded, "yuv420p", "h264")
    back = list(video.read_frames(out))
    assert len(back) == 5 and back[0].shape == (encoded[1], encoded[0], 3)
    # The original pixels sit at the top-left, unmoved; the added column/row repeats the edge.
    assert np.abs(back[2][:height, :width].astype(int) - frames[2]).mean() < 4
    # One column or row alone carries more codec noise at the frame edge (a black pad would be ~100 off).
    if encoded[0] > width:
        assert np.abs(back[2][:height, width].astype(int) - frames[2][:, width - 1]).mean() < 8
    if encoded[1] > height:
        assert np.abs(back[2][height, :width].astype(int) - frames[2][height - 1]).mean() < 8


def test_writer_rejects_wrong_frames_and_abort_leaves_nothing(media_dir):
    folder = media_dir / "aborted"
    with pytest.raises(ValueError):
        with video.VideoWriter(folder / "out.mp4", 25, 64, 48) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            writer.write(np.zeros((64, 48, 3), np.uint8))
    assert list(folder.iterdir()) == []
    writer = video.VideoWriter(folder / "out.mp4", 25, 64, 48)
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.abort()
    assert writer._proc.returncode is not None and list(folder.iterdir()) == []


@pytest.mark.parametrize("audio, codec, seconds", [((44100, 2), ["-c:a", "pcm_s16le"], 1.4),
                                                    ((48000, 1), ["-c:a", "aac"], 3.0),
                                                    ((22050, 1), ["-c:a", "libmp3lame"], 2.5)])
def test_write_then_mux_keeps_user_audio(media_dir, audio, codec, seconds):
    rate, channels = audio
    suffix = {"pcm_s16le": ".wav", "aac": ".m4a", "libmp3lame": ".mp3"}[codec[1]]
    speech = media_dir / f"voice_{rate}_{channels}{suffix}"
    ffmpeg("-f", "lavfi", "-i", f"sine=f=300:r={rate}:d={seconds}", "-ac", str(channels), *codec, str(speech))
    silent = media_dir / f"silent_{rate}.mp4"
    with video.VideoWriter(silent, 25, 96, 64) as writer:
        for i in range(50):
            writer.write(_gradient(96, 64, i))
    out = video.mux_audio(silent, speech, media_dir / f"muxed_{rate}.mp4", duration=2.0)  # padded or trimmed
    info = video.probe(out)
    assert (info.width, info.height, info.fps, info.frame_count) == (96, 64, 25, 50)
    streams = probe_streams(out)["streams"]
    sound = next(s for s in streams if s["codec_type"] == "audio")
    assert (sound["codec_name"], int(sound["sample_rate"]), sound["channels"]) == ("aac", rate, channels)
    assert abs(float(sound["duration"]) - 2.0) <= 1 / 25
    assert [p for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_mux_replaces_an_existing_output_only_once_the_new_one_is_complete(media_dir, mp4):
    out = media_dir / "replaced.mp4"
    out.write_bytes(b"the old file")
    with pytest.raises(InputError, match="no audio stream"):
        video.mux_audio(mp4, make_clip(media_dir / "mute.mp4", audio=None, seconds=1.0), out, duration=1.0)
    assert out.read_bytes() == b"the old file"
    video.mux_audio(mp4, mp4, out, duration=1.0)
    assert video.probe(out).duration >= 1.0  # the new video, cut at a packet boundary
    assert [p for p in media_dir.iterdir() if p.name.startswith(".replaced")] == []


def test_mux_from_an_offset(media_dir, mp4):
    speech = media_dir / "voice_offset.wav"
    # 1 s of silence then a tone: starting at 1 s must give tone from the first sample.
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=1", "-f", "lavfi", "-i", "sine=f=500:r=16000:d=2",
           "-filter_complex", "[0][1]concat=n=2:v=0:a=1", str(speech))
    out = video.mux_audio(mp4, speech, media_dir / "offset.mp4", duration=2.0, audio_start=1.0)
    pcm = subprocess.run([FFMPEG, "-v", "error", "-i", str(out), "-map", "0:a", "-f", "s16le", "-ac", "1", "-"],
                         check=True, capture_output=True).stdout
    samples = np.frombuffer(pcm, np.int16).astype(float)
    assert np.abs(samples[800:1600]).mean() > 1000


def test_mux_refuses_audio_without_sound(media_dir):
    silent = make_clip(media_dir / "no_audio.mp4", audio=None, seconds=1.0)
    with pytest.raises(InputError, match="no audio stream"):
        video.mux_audio(silent, silent, media_dir / "never.mp4", duration=1.0)
    assert not (media_dir / "never.mp4").exists()


def test_hostile_file_names(media_dir):
    folder = media_dir / "we ird $(touch pwned) 'q'"
    folder.mkdir()
    name = folder / "-my \"clip\" $(touch pwned) `id`; 'x'.mp4"
    make_clip(Path(str(name)), seconds=1.0)
    assert video.probe(name).frame_count == 25
    assert len(list(video.read_frames(name, 25, start=3, count=4))) == 4
    out = folder / "out $(touch pwned).mp4"
    with video.VideoWriter(out, 25, 64, 48) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
    muxed = video.mux_audio(out, name, folder / "final 'x' $(touch pwned).mp4", duration=0.04)
    assert video.probe(muxed).has_audio
    assert not list(media_dir.rglob("pwned")) and not Path("pwned").exists()


# -------------------------------------------------------------------------------------------- refusals


def test_an_ffmpeg_crash_is_not_blamed_on_the_video(mp4, monkeypatch):
    info = video.probe(mp4)
    monkeypatch.setattr(media, "ffmpeg_command", lambda *args, **kw: ["sh", "-c", "kill -SEGV $$", "sh", *args])
    for call in (lambda: list(video.read_frames(mp4, info=info)), lambda: count_frames(mp4, info=info)):
        with pytest.raises(RuntimeError, match="ffmpeg crashed") as err:
            call()
        assert not isinstance(err.value, InputError)


def test_text_and_empty_files_are_refused(media_dir):
    text = media_dir / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(InputError, match="not a readable media file"):
        video.probe(text)
    empty = media_dir / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        video.probe(empty)
    with pytest.raises(InputError, match="does not exist"):
        video.probe(media_dir / "missing.mp4")


def test_audio_only_is_refused(media_dir):
    wav = media_dir / "voice.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=r=16000:d=1", str(wav))
    with pytest.raises(InputError, match="no video stream"):
        video.probe(wav)


def test_zero_frames_are_refused(media_dir, mp4):
    # A Matroska file that declares a video stream but holds no video packet (all of them fall after -t).
    empty = media_dir / "zero_frames.mkv"
    ffmpeg("-itsoffset", "5", "-i", str(mp4), "-f", "lavfi", "-i", "sine=d=2", "-map", "0:v", "-map", "1:a",
           "-c:v", "copy", "-c:a", "aac", "-t", "1", str(empty))
    assert any(s["codec_type"] == "video" for s in probe_streams(empty)["streams"])
    with pytest.raises(InputError, match="no video frames"):
        video.probe(empty)


def test_size_and_duration_caps(mp4):
    with pytest.raises(InputError, match=r"160x120.*100 pixels.*LATENTSYNC_MAX_SIDE.*max_side"):
        video.probe(mp4, max_side=100)
    with pytest.raises(InputError, match=r"1 s.*LATENTSYNC_MAX_DURATION.*max_duration"):
        video.probe(mp4, max_duration=1.0)
    assert video.probe(mp4, max_side=160, max_duration=2.5).width == 160


@pytest.fixture(scope="module")
def secret(media_dir) -> Path:
    """A local file that a playlist would smuggle into the output (a red MPEG-TS segment beside it)."""
    path = media_dir / "secret.ts"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64:r=25:d=1", "-c:v", "libx264", str(path))
    return path


def _hls(folder: Path, name: str, secret: Path) -> Path:
    path = folder / name
    path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{secret.name}\n#EXT-X-ENDLIST\n")
    return path


def _ffconcat(folder: Path, name: str, secret: Path) -> Path:
    path = folder / name
    path.write_text(f"ffconcat version 1.0\nfile {secret.name}\n")
    return path


@pytest.mark.parametrize("make, name", [(_hls, "list.m3u8"), (_hls, "list_as.mp4"),
                                        (_ffconcat, "list.ffconcat"), (_ffconcat, "concat_as.mp4")])
def test_playlists_are_refused(media_dir, secret, mp4, make, name):
    import av

    playlist = make(media_dir, name, secret)
    # The premise: unrestricted, the pinned FFmpeg's libraries follow the playlist into the secret file. (FFmpeg 7
    # no longer guesses HLS behind a foreign extension, so that one is named; a wrapper could name it too.)
    forced = "hls" if make is _hls and not name.endswith(".m3u8") else None
    with av.open(str(playlist), format=forced) as plain:
        assert [frame.width for frame in plain.decode(video=0)][:1] == [64]

    with pytest.raises(InputError, match="not in an accepted format"):
        video.probe(playlist)
    disguised = video.VideoInfo(width=64, height=64, rotation=0, fps=25.0, frame_count=25, duration=1.0,
                                has_audio=False, audio_sample_rate=None, audio_channels=None,
                                format_name="mov,mp4,m4a,3gp,3g2,mj2")
    with pytest.raises(InputError):
        list(video.read_frames(playlist, 25, info=disguised))
    with pytest.raises(InputError):
        video.mux_audio(mp4, playlist, media_dir / f"leak_{name}.mp4", duration=1.0)
    assert not (media_dir / f"leak_{name}.mp4").exists()


# ------------------------------------------------------------------------------------------ the one ffmpeg


def test_the_pinned_ffmpeg_and_probe_are_one_release():
    import av
    import imageio_ffmpeg

    exe = Path(media.ffmpeg_exe())
    assert exe.is_absolute() and Path(imageio_ffmpeg.__file__).parent in exe.parents
    version = subprocess.run([str(exe), "-version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("ffmpeg version 7.0.2") and av.ffmpeg_version_info == "7.0.2"


_RUN_MEDIA = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np
    from latentsync import audio, video
    clip, voice, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
    info = video.probe(clip)
    frames = list(video.read_frames(clip, 25, info=info))
    with video.VideoWriter(out / "silent.mp4", 25, info.width, info.height) as writer:
        for frame in frames:
            writer.write(frame)
    final = video.mux_audio(out / "silent.mp4", voice, out / "final.mp4", duration=len(frames) / 25)
    print(json.dumps({"info": str(info), "frames": digest(np.stack(frames)),
                      "written": digest(np.stack(list(video.read_frames(final)))),
                      "audio": digest(audio.load_audio(voice)), "muxed": digest(audio.load_audio(final))}))
""")


def test_no_ffmpeg_from_path_is_ever_run(media_dir, tmp_path):
    """With a PATH whose ffmpeg/ffprobe only leave a trace, or with the system's on PATH, results are identical."""
    clip = make_clip(media_dir / "path_clip.ts", rate="30", seconds=1.0, audio=None)  # .ts: iconv crash path too
    voice = media_dir / "voice_22050.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=22050:d=1.2", str(voice))  # resampled to 16 kHz by load_audio
    decoys = tmp_path / "bin"
    decoys.mkdir()
    trace = tmp_path / "decoy-ran"
    for name in ("ffmpeg", "ffprobe"):
        (decoys / name).write_text(f"#!/bin/sh\necho {name} >> '{trace}'\nexit 1\n")
        (decoys / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "IMAGEIO_FFMPEG_EXE"}
    results = []
    # The machine's PATH as it is, without the suite-wide decoys of conftest.py: Debian's ffmpeg where installed.
    machine_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "decoy-bin" not in p)
    for path in (str(decoys), machine_path):  # decoys only, then the machine's PATH
        out = tmp_path / f"run{len(results)}"
        out.mkdir()
        proc = subprocess.run([sys.executable, "-c", _RUN_MEDIA, str(clip), str(voice), str(out)], cwd=REPO,
                              env={**env, "PATH": path}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(proc.stdout)
    assert not trace.exists()
    assert results[0] == results[1]


# ------------------------------------------------------------------------------------------ output rows


@pytest.mark.parametrize("name", ["out.webm", "out.avi", "out.gif", "out.MP3", "out"])
def test_output_containers_that_cannot_hold_h264_aac_are_refused(media_dir, mp4, name):
    with pytest.raises(InputError, match=r"cannot hold the H\.264 video and AAC audio.*\.mp4, \.mov, \.mkv or \.m4v"):
        video.check_output_container(media_dir / name)
    with pytest.raises(InputError, match="cannot hold"):
        video.mux_audio(mp4, mp4, media_dir / name, duration=1.0)
    assert not (media_dir / name).exists()


@pytest.mark.parametrize("suffix", [".mov", ".mkv", ".MP4", ".m4v"])
def test_mov_and_mkv_outputs_keep_rate_and_sound(media_dir, mp4, suffix):
    silent = media_dir / f"silent{suffix}"
    with video.VideoWriter(silent, 25, 96, 64) as writer:
        for i in range(50):
            writer.write(_gradient(96, 64, i))
    out = video.mux_audio(silent, mp4, media_dir / f"final{suffix}", duration=2.0)
    info = video.probe(out)
    assert (info.fps, info.has_audio) == (25, True) and abs(info.duration - 2.0) <= 0.05
    assert len(list(video.read_frames(out))) == 50


def test_mux_failure_of_our_own_file_is_not_blamed_on_the_audio(media_dir, mp4):
    broken = media_dir / "broken_silent.mp4"
    broken.write_bytes(b"\x00" * 4096)
    with pytest.raises(RuntimeError, match=r"muxing audio into 'blame\.mp4' failed") as caught:
        video.mux_audio(broken, mp4, media_dir / "blame.mp4", duration=1.0)
    assert not isinstance(caught.value, InputError) and "could not read" not in str(caught.value)
    assert not (media_dir / "blame.mp4").exists()


@pytest.fixture(scope="module")
def truncated(media_dir) -> Path:
    """An MP4 (index first) cut after a third of its bytes: the container says 75 frames, ~20 decode."""
    whole = make_clip(media_dir / "whole.mp4", size="320x240", seconds=3.0, audio=None,
                      extra=["-movflags", "+faststart"])
    data = whole.read_bytes()
    path = media_dir / "truncated.mp4"
    path.write_bytes(data[: len(data) // 3])
    return path


def test_truncated_video_is_read_as_far_as_it_goes_with_a_warning(truncated, caplog):
    info = video.probe(truncated)
    assert info.frame_count == 75
    with caplog.at_level(logging.WARNING, logger="latentsync.video"):
        frames = list(video.read_frames(truncated, 25, info=info))
        # A block-wise reader reaching the end again does not repeat it.
        list(video.read_frames(truncated, 25, start=len(frames) - 2, count=16, info=info))
    assert 5 < len(frames) < 40
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"video 'truncated.mp4' stopped decoding after {len(frames)} of the 75 frames its container "
                        f"states (truncated or damaged file?); processing the {len(frames)} frames read"]


def test_whole_videos_read_without_a_warning(mp4, vfr, long30, caplog):
    with caplog.at_level(logging.WARNING, logger="latentsync.video"):
        for path in (mp4, vfr, long30):
            for fps in (None, 25):
                assert list(video.read_frames(path, fps))
    assert not caplog.records


# ---------------------------------------------------------------------------------------------- caps


def test_caps_come_from_the_entry_points_environment():
    assert media.caps_from_env({}) == media.MediaCaps(media.MAX_SIDE_PX, media.MAX_DURATION_S)
    caps = media.caps_from_env({"LATENTSYNC_MAX_SIDE": "1920", "LATENTSYNC_MAX_DURATION": "90.5", "OTHER": "x"})
    assert caps == media.MediaCaps(1920, 90.5)
    for name, value in [("LATENTSYNC_MAX_SIDE", "big"), ("LATENTSYNC_MAX_SIDE", "0"), ("LATENTSYNC_MAX_SIDE", "1.5"),
                        ("LATENTSYNC_MAX_DURATION", "inf"), ("LATENTSYNC_MAX_DURATION", "-3"),
                        ("LATENTSYNC_MAX_DURATION", "nan")]:
        with pytest.raises(InputError, match=name):
            media.caps_from_env({name: value})


def test_the_hidden_temporary_name_of_a_longest_legal_name_stays_legal(tmp_path):
    limit = media.name_max(tmp_path)
    for name in ("a" * (limit - 4) + ".mp4", "é" * ((limit - 4) // 2) + ".mov", "short.mkv"):
        temp = _temp_beside(tmp_path / name)
        assert len(temp.name.encode()) <= limit and temp.parent == tmp_path and temp.suffix == Path(name).suffix
        assert temp.name.startswith(".") and ".part" in temp.name
        temp.write_bytes(b"")  # the file system takes it
    assert len({_temp_beside(tmp_path / ("b" * (limit - 4) + ".mp4")) for _ in range(5)}) == 5
