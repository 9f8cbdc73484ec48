"""ensure_weights / verify_weights against a real HTTP server on 127.0.0.1 (Range support written here)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, shared_file
from latentsync import InputError
from latentsync import download
from latentsync.download import ensure_weights, files_for, read_manifest, verify_weights

RNG = random.Random(0)
FILES = {  # what the server holds; sizes make a cut mid-file and several reads per file meaningful
    "unet16.pt": RNG.randbytes(3 * (1 << 20) + 123),
    "unet15.pt": RNG.randbytes(40_000),
    "tiny.pt": RNG.randbytes(70_000),
    "vae.json": b'{"latent_channels": 4}\n',
    "mask.png": RNG.randbytes(1871),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer(http.server.ThreadingHTTPServer):
    """Serves FILES with single-range requests; can cut one file's first response mid-way or hold requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()
        self.barrier: threading.Barrier | None = None
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        ranged = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((name, ranged))
            cut = name in self.server.cut_once
            self.server.cut_once.discard(name)
        if self.server.barrier is not None:
            self.server.barrier.wait()  # every parallel download must be in flight at once to pass
        data = FILES.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if ranged:
            m = re.fullmatch(r"bytes=(\d+)-", ranged)
            assert m, ranged
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:  # promise the whole body, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("LATENTSYNC_WEIGHTS_DIR", "LATENTSYNC_VERSION", "LATENTSYNC_MANIFEST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    # a real pget on this machine would take over the Python downloader under test
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "pget").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))


def write_manifest(tmp_path: Path, base: str, *, sizes: bool = True, shas: bool = True,
                   override: dict[str, str] | None = None) -> Path:
    """A manifest in weights.txt's format pointing at the local server."""
    rows = [("1.6", "unet16.pt", "latentsync_unet.pt"), ("1.5", "unet15.pt", "latentsync_unet.pt"),
            ("all", "tiny.pt", "whisper/tiny.pt"), ("all", "vae.json", "sd-vae-ft-mse/config.json"),
            ("all", "mask.png", "mask.png")]
    lines = ["# test manifest: version url dest size sha256"]
    for version, name, dest in rows:
        size = str(len(FILES[name])) if sizes else "-"
        digest = (override or {}).get(dest) or (sha(FILES[name]) if shas else "-")
        lines.append(f"{version} {base}/{name} {dest} {size} {digest}")
    path = tmp_path / "weights.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def expect_folder(folder: Path, version: str = "1.6") -> None:
    unet = "unet16.pt" if version == "1.6" else "unet15.pt"
    assert (folder / "latentsync_unet.pt").read_bytes() == FILES[unet]
    assert (folder / "whisper/tiny.pt").read_bytes() == FILES["tiny.pt"]
    assert (folder / "sd-vae-ft-mse/config.json").read_bytes() == FILES["vae.json"]
    assert (folder / "mask.png").read_bytes() == FILES["mask.png"]
    assert not list(folder.rglob("*.part")) and not list(folder.rglob("*.pget"))


# --- the manifest ---------------------------------------------------------------------------------------------------

def test_repo_manifest_lists_every_file_of_both_versions():
    manifest = read_manifest(REPO / "weights.txt")
    needed = {"latentsync_unet.pt", "whisper/tiny.pt", "stable_syncnet.pt", "sd-vae-ft-mse/config.json",
              "sd-vae-ft-mse/diffusion_pytorch_model.safetensors", "mask.png"}
    unets = {}
    for version in ("1.5", "1.6"):
        entries = {e.dest: e for e in files_for(manifest, version)}
        assert set(entries) == needed
        unets[version] = entries["latentsync_unet.pt"].url
        hf = f"https://huggingface.co/ByteDance/LatentSync-{version}/resolve/main"
        assert unets[version] == f"{hf}/latentsync_unet.pt"
        assert all(e.url.startswith("https://") for e in entries.values())
    assert unets["1.5"] != unets["1.6"]


def test_repo_manifest_checksum_of_mask_matches_the_reference_asset():
    mask = shared_file("reference", "mask.png").read_bytes()
    entry = next(e for e in read_manifest(REPO / "weights.txt") if e.dest == "mask.png")
    assert (entry.size, entry.sha256) == (len(mask), sha(mask))


@pytest.mark.parametrize("line, words", [
    ("1.7 https://x/a a.pt - -", "version"),
    ("1.6 https://x/a ../a.pt - -", "inside the weights folder"),
    ("1.6 https://x/a /etc/a.pt - -", "inside the weights folder"),
    ("1.6 ftp://x/a a.pt - -", "http(s) URL"),
    ("1.6 https://x/a a.pt 12kB -", "size"),
    ("1.6 https://x/a a.pt - abc", "sha256"),
    ("1.6 https://x/a a.pt -", "5 fields"),
])
def test_bad_manifest_lines_are_refused_with_their_line_number(tmp_path, line, words):
    path = tmp_path / "weights.txt"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(InputError, match=rf"weights\.txt:2: .*{re.escape(words)}|weights\.txt:2: expected"):
        read_manifest(path)


def test_version_comes_from_the_argument_then_the_environment(tmp_path, server, monkeypatch):
    manifest = write_manifest(tmp_path, server.base)
    monkeypatch.setenv("LATENTSYNC_VERSION", "1.5")
    expect_folder(ensure_weights(manifest, tmp_path / "w15"), "1.5")
    expect_folder(ensure_weights(manifest, tmp_path / "w16", "1.6"), "1.6")
    with pytest.raises(InputError, match="1.4"):
        ensure_weights(manifest, tmp_path / "w14", "1.4")


# --- downloading ----------------------------------------------------------------------------------------------------

def test_cut_connection_is_resumed_with_a_range_request(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    server.cut_once.add("unet16.pt")
    folder = ensure_weights(manifest, tmp_path / "weights", "1.6")
    expect_folder(folder)
    tries = [r for name, r in server.requests if name == "unet16.pt"]
    half = len(FILES["unet16.pt"]) // 2
    assert tries == [None, f"bytes={half}-"]


def test_cut_connection_is_resumed_without_a_known_size(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False, shas=False)
    server.cut_once.add("unet16.pt")
    expect_folder(ensure_weights(manifest, tmp_path / "weights", "1.6"))
    assert [r for name, r in server.requests if name == "unet16.pt"][1] == f"bytes={len(FILES['unet16.pt']) // 2}-"


def test_partial_file_left_by_an_earlier_run_is_resumed(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "latentsync_unet.pt.part").write_bytes(FILES["unet16.pt"][:1000])
    expect_folder(ensure_weights(manifest, folder, "1.6"))
    assert [r for name, r in server.requests if name == "unet16.pt"] == ["bytes=1000-"]


def test_complete_partial_file_is_finished_without_a_body(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False)
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "mask.png.part").write_bytes(FILES["mask.png"])
    expect_folder(ensure_weights(manifest, folder, "1.6"))
    assert [r for name, r in server.requests if name == "mask.png"] == [f"bytes={len(FILES['mask.png'])}-"]


def test_checksum_mismatch_is_refused_and_nothing_is_left_behind(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, override={"whisper/tiny.pt": "0" * 64})
    folder = tmp_path / "weights"
    with pytest.raises(InputError, match=r"whisper/tiny\.pt.*sha256"):
        ensure_weights(manifest, folder, "1.6")
    assert not (folder / "whisper/tiny.pt").exists()
    assert not list(folder.rglob("tiny.pt*"))
    assert (folder / "mask.png").read_bytes() == FILES["mask.png"]  # the other files still arrived


def test_size_disagreeing_with_the_server_is_refused_before_the_body(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    text = manifest.read_text().replace(f" {len(FILES['tiny.pt'])} ", f" {len(FILES['tiny.pt']) + 1} ")
    manifest.write_text(text)
    with pytest.raises(InputError, match=r"whisper/tiny\.pt"):
        ensure_weights(manifest, tmp_path / "weights", "1.6")
    assert not list((tmp_path / "weights").rglob("tiny.pt*"))


def test_missing_file_on_the_server_names_the_file_and_url(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    manifest.write_text(manifest.read_text().replace("/vae.json", "/gone.json"))
    with pytest.raises(RuntimeError, match=r"sd-vae-ft-mse/config\.json.*gone\.json.*404"):
        ensure_weights(manifest, tmp_path / "weights", "1.6")


def test_valid_files_already_present_are_not_requested(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = ensure_weights(manifest, tmp_path / "weights", "1.6")
    server.requests.clear()
    assert ensure_weights(manifest, folder, "1.6") == folder
    assert server.requests == []


def test_prefilled_files_are_checked_then_kept(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = tmp_path / "weights"
    (folder / "whisper").mkdir(parents=True)
    (folder / "whisper/tiny.pt").write_bytes(FILES["tiny.pt"])
    (folder / "mask.png").write_bytes(b"not the mask")
    expect_folder(ensure_weights(manifest, folder, "1.6"))
    names = [name for name, _ in server.requests]
    assert "tiny.pt" not in names and names.count("mask.png") == 1


def test_several_files_download_in_parallel(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    server.barrier = threading.Barrier(4, timeout=20)  # all four requests must be open at the same time
    expect_folder(ensure_weights(manifest, tmp_path / "weights", "1.6", jobs=4))
    assert len(server.requests) == 4


def test_a_folder_holds_one_version(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = ensure_weights(manifest, tmp_path / "weights", "1.6")
    with pytest.raises(InputError, match="holds LatentSync 1.6"):
        ensure_weights(manifest, folder, "1.5")
    with pytest.raises(InputError, match="holds LatentSync 1.6"):
        verify_weights(folder, "1.5", manifest)


# --- pget -----------------------------------------------------------------------------------------------------------

STUB = """#!{python}
# STAND-IN for Replicate's pget (written by tests/test_download.py): records how it was called, then fetches each
# `url dest` line of the manifest with urllib, the way `pget multifile` would.
import json, sys, urllib.request
log = {log!r}
lines = open(sys.argv[2]).read().split("\\n") if len(sys.argv) > 2 else []
json.dump({{"argv": sys.argv[1:], "manifest": lines}}, open(log, "w"))
if {fail}:
    sys.exit(1)
for line in filter(None, lines):
    url, dest = line.split()
    with urllib.request.urlopen(url) as r, open(dest, "xb") as out:
        out.write(r.read())
"""


def install_stub_pget(tmp_path: Path, monkeypatch, *, fail: bool = False) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "pget-call.json"
    stub = bindir / "pget"
    stub.write_text(STUB.format(python=sys.executable, log=str(log), fail=fail))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_pget_multifile_gets_a_manifest_of_url_dest_lines(tmp_path, server, monkeypatch):
    log = install_stub_pget(tmp_path, monkeypatch)
    manifest = write_manifest(tmp_path, server.base)
    folder = ensure_weights(manifest, tmp_path / "weights", "1.6")
    expect_folder(folder)
    call = json.loads(log.read_text())
    assert call["argv"][0] == "multifile" and len(call["argv"]) == 2
    lines = [line.split(" ") for line in call["manifest"] if line]
    assert len(lines) == 4 and all(len(parts) == 2 for parts in lines)
    for url, dest in lines:
        assert url.startswith(server.base + "/")
        assert Path(dest).is_absolute() and Path(dest).parent.resolve().is_relative_to(folder.resolve())
    assert {Path(dest).name for _, dest in lines} == {"latentsync_unet.pt.pget", "tiny.pt.pget", "config.json.pget",
                                                      "mask.png.pget"}


def test_pget_output_is_checked_like_any_download(tmp_path, server, monkeypatch):
    install_stub_pget(tmp_path, monkeypatch)
    manifest = write_manifest(tmp_path, server.base, override={"mask.png": "1" * 64})
    with pytest.raises(InputError, match=r"mask\.png.*sha256"):
        ensure_weights(manifest, tmp_path / "weights", "1.6")
    assert not list((tmp_path / "weights").glob("mask.png*"))


def test_failing_pget_falls_back_to_python(tmp_path, server, monkeypatch):
    log = install_stub_pget(tmp_path, monkeypatch, fail=True)
    manifest = write_manifest(tmp_path, server.base)
    expect_folder(ensure_weights(manifest, tmp_path / "weights", "1.6"))
    assert log.exists() and len(server.requests) == 4


# --- pre-filled folders (LATENTSYNC_WEIGHTS_DIR) and verification ---------------------------------------------------

def test_weights_dir_from_the_environment_skips_the_network(tmp_path, server, monkeypatch):
    manifest = write_manifest(tmp_path, server.base)
    baked = ensure_weights(manifest, tmp_path / "baked", "1.6")
    server.requests.clear()
    monkeypatch.setenv("LATENTSYNC_WEIGHTS_DIR", str(baked))
    assert ensure_weights(manifest, version="1.6") == baked
    (baked / "whisper/tiny.pt").unlink()
    with pytest.raises(InputError, match=r"whisper/tiny\.pt: missing"):
        ensure_weights(manifest, version="1.6")
    assert server.requests == []


def test_verify_refuses_a_truncated_file(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False, shas=False)
    folder = ensure_weights(manifest, tmp_path / "weights", "1.6")
    verify_weights(folder, "1.6", manifest)
    with open(folder / "latentsync_unet.pt", "r+b") as f:  # sizes unknown to the manifest: the record knows them
        f.truncate(1000)
    with pytest.raises(InputError, match=r"latentsync_unet\.pt: 1000 bytes.*truncated"):
        verify_weights(folder, "1.6", manifest)


def test_verify_refuses_a_sha256_mismatch_in_a_prefilled_folder(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = tmp_path / "prefilled"
    for dest, name in [("latentsync_unet.pt", "unet16.pt"), ("whisper/tiny.pt", "tiny.pt"),
                       ("sd-vae-ft-mse/config.json", "vae.json"), ("mask.png", "mask.png")]:
        (folder / dest).parent.mkdir(parents=True, exist_ok=True)
        (folder / dest).write_bytes(FILES[name])
    verify_weights(folder, "1.6", manifest)
    damaged = bytearray(FILES["mask.png"])
    damaged[100] ^= 0xFF
    (folder / "mask.png").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=r"mask\.png: sha256 [0-9a-f]{64}, expected"):
        verify_weights(folder, "1.6", manifest)
    assert server.requests == []
