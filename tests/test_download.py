"""ensure_weights (fills the default folder, verifies a named one) against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import random
import re
import socket
import stat
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import REPO, shared_file
from latentsync import InputError, ResourceError, download
from latentsync import manifest as manifest_mod
from latentsync.download import ensure_weights
from latentsync.manifest import default_weights_dir, files_for, read_manifest
from mounts import read_only_tmpfs

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


def tar_of(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding ``members`` (name → bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# One version's bundle, as a Replicate-style weights archive: every file of 1.6 plus one the manifest does not list.
ARCHIVE_MEMBERS = {"latentsync_unet.pt": FILES["unet16.pt"], "whisper/tiny.pt": FILES["tiny.pt"],
                   "sd-vae-ft-mse/config.json": FILES["vae.json"], "mask.png": FILES["mask.png"],
                   "README.txt": b"not in the manifest\n"}
FILES["bundle16.tar"] = tar_of(ARCHIVE_MEMBERS)


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
    for name in ("LATENTSYNC_WEIGHTS_DIR", "LATENTSYNC_VERSION", "LATENTSYNC_MANIFEST", "HF_ENDPOINT"):
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


def fill(manifest: Path, tmp_path: Path, version: str = "1.6", **kwargs) -> Path:
    """``ensure_weights`` on the default folder (the only one it downloads into), under ``tmp_path/cache``."""
    return ensure_weights(manifest, None, version, cache_home=tmp_path / "cache", **kwargs)


def default_folder(tmp_path: Path, version: str = "1.6") -> Path:
    return default_weights_dir(version, tmp_path / "cache")


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``folder`` (hidden ones too) with its size, mtime and bytes: to prove nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


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
        assert re.fullmatch(rf"https://huggingface\.co/ByteDance/LatentSync-{version}/resolve/[0-9a-f]{{40}}/"
                            r"latentsync_unet\.pt", unets[version])
        assert all(e.url.startswith("https://") for e in entries.values())
    assert unets["1.5"] != unets["1.6"]


def test_repo_manifest_states_size_and_sha256_of_every_file_and_pins_hugging_face_revisions():
    for entry in read_manifest(REPO / "weights.txt"):
        assert entry.size is not None and entry.sha256 is not None, entry.dest
        if entry.url.startswith("https://huggingface.co/"):
            assert re.search(r"/resolve/[0-9a-f]{40}/", entry.url), f"{entry.url} follows a moving branch"
        if entry.url.startswith("https://raw.githubusercontent.com/"):
            assert re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[0-9a-f]{40}/", entry.url), entry.url
    whisper = {e.sha256 for e in read_manifest(REPO / "weights.txt") if e.dest == "whisper/tiny.pt"}
    assert whisper == {"65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9"}  # OpenAI's tiny.pt


def test_default_manifest_is_the_shipped_one():
    assert read_manifest() == read_manifest(REPO / "weights.txt")


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
    ("1.6 - ./ - -", "archive line needs a URL"),
])
def test_bad_manifest_lines_are_refused_with_their_line_number(tmp_path, line, words):
    path = tmp_path / "weights.txt"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(InputError, match=rf"weights\.txt:2: .*{re.escape(words)}|weights\.txt:2: expected"):
        read_manifest(path)


def test_version_comes_from_the_argument_and_the_environment_is_not_read(tmp_path, server, monkeypatch):
    manifest = write_manifest(tmp_path, server.base)
    monkeypatch.setenv("LATENTSYNC_VERSION", "1.5")  # the entry points read it, not the library
    expect_folder(fill(manifest, tmp_path, "1.5"), "1.5")
    expect_folder(ensure_weights(manifest, None, cache_home=tmp_path / "cache"), "1.6")
    assert default_folder(tmp_path, "1.5") != default_folder(tmp_path, "1.6")
    with pytest.raises(InputError, match="1.4"):
        fill(manifest, tmp_path, "1.4")


# --- downloading ----------------------------------------------------------------------------------------------------

def test_cut_connection_is_resumed_with_a_range_request(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    server.cut_once.add("unet16.pt")
    folder = fill(manifest, tmp_path)
    expect_folder(folder)
    tries = [r for name, r in server.requests if name == "unet16.pt"]
    half = len(FILES["unet16.pt"]) // 2
    assert tries == [None, f"bytes={half}-"]


def test_cut_connection_is_resumed_without_a_known_size(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False, shas=False)
    server.cut_once.add("unet16.pt")
    expect_folder(fill(manifest, tmp_path))
    assert [r for name, r in server.requests if name == "unet16.pt"][1] == f"bytes={len(FILES['unet16.pt']) // 2}-"


def test_partial_file_left_by_an_earlier_run_is_resumed(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = default_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "latentsync_unet.pt.part").write_bytes(FILES["unet16.pt"][:1000])
    expect_folder(fill(manifest, tmp_path))
    assert [r for name, r in server.requests if name == "unet16.pt"] == ["bytes=1000-"]


def test_complete_partial_file_is_finished_without_a_body(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False)
    folder = default_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "mask.png.part").write_bytes(FILES["mask.png"])
    expect_folder(fill(manifest, tmp_path))
    assert [r for name, r in server.requests if name == "mask.png"] == [f"bytes={len(FILES['mask.png'])}-"]


@pytest.mark.parametrize("where", ["body", "verification"])
def test_an_interrupted_setup_leaves_nothing_a_later_boot_trusts(tmp_path, server, monkeypatch, where):
    """A setup killed mid-download or mid-hash (Cog's setup timeout, a stopped container) leaves only ``.part``
    files: the weights folder's own names appear only after their size and sha256 were checked."""
    manifest = write_manifest(tmp_path, server.base)
    folder = default_folder(tmp_path)
    real_fetch, real_sha256 = download._fetch, download._sha256

    def cut_fetch(entry, url, partial):
        if entry.dest == "latentsync_unet.pt":
            partial.write_bytes(FILES["unet16.pt"][:1000])
            raise KeyboardInterrupt  # what a timeout's signal raises in the setup thread
        real_fetch(entry, url, partial)

    def cut_sha256(path):
        if path.name.startswith("latentsync_unet.pt"):
            raise KeyboardInterrupt
        return real_sha256(path)

    if where == "body":
        monkeypatch.setattr(download, "_fetch", cut_fetch)
    else:
        monkeypatch.setattr(download, "_sha256", cut_sha256)
    with pytest.raises(KeyboardInterrupt):
        fill(manifest, tmp_path, jobs=1)
    monkeypatch.undo()
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.0)
    assert not (folder / "latentsync_unet.pt").exists()
    assert (folder / "latentsync_unet.pt.part").is_file()
    with pytest.raises(InputError, match=r"latentsync_unet\.pt: missing"):
        ensure_weights(manifest, folder, "1.6")  # a boot that only verifies refuses the folder
    expect_folder(fill(manifest, tmp_path))  # the next boot finishes the download and checks it


def test_checksum_mismatch_is_refused_and_nothing_is_left_behind(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, override={"whisper/tiny.pt": "0" * 64})
    folder = default_folder(tmp_path)
    with pytest.raises(InputError, match=r"whisper/tiny\.pt.*sha256"):
        fill(manifest, tmp_path)
    assert not (folder / "whisper/tiny.pt").exists()
    assert not list(folder.rglob("tiny.pt*"))
    assert (folder / "mask.png").read_bytes() == FILES["mask.png"]  # the other files still arrived


def test_size_disagreeing_with_the_server_is_refused_before_the_body(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    text = manifest.read_text().replace(f" {len(FILES['tiny.pt'])} ", f" {len(FILES['tiny.pt']) + 1} ")
    manifest.write_text(text)
    with pytest.raises(InputError, match=r"whisper/tiny\.pt"):
        fill(manifest, tmp_path)
    assert not list(default_folder(tmp_path).rglob("tiny.pt*"))


def test_missing_file_on_the_server_names_the_file_and_url(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    manifest.write_text(manifest.read_text().replace("/vae.json", "/gone.json"))
    with pytest.raises(ResourceError, match=r"sd-vae-ft-mse/config\.json.*gone\.json.*404"):
        fill(manifest, tmp_path)


def test_valid_files_already_present_are_not_requested(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = fill(manifest, tmp_path)
    server.requests.clear()
    assert fill(manifest, tmp_path) == folder
    assert server.requests == []


def test_valid_files_in_the_default_folder_are_kept_and_the_rest_fetched(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = default_folder(tmp_path)
    (folder / "whisper").mkdir(parents=True)
    (folder / "whisper/tiny.pt").write_bytes(FILES["tiny.pt"])
    expect_folder(fill(manifest, tmp_path))
    names = [name for name, _ in server.requests]
    assert "tiny.pt" not in names and names.count("mask.png") == 1


def test_a_wrong_file_in_the_default_folder_is_reported_and_never_deleted(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = default_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "mask.png").write_bytes(b"not the mask")
    with pytest.raises(InputError) as caught:
        fill(manifest, tmp_path)
    message = str(caught.value)
    assert "mask.png: 12 bytes, expected 1871" in message and "left untouched" in message and "\n" not in message
    assert (folder / "mask.png").read_bytes() == b"not the mask"
    assert server.requests == []
    same_size = bytearray(FILES["mask.png"])
    same_size[0] ^= 0xFF
    (folder / "mask.png").write_bytes(bytes(same_size))
    expected = rf"mask\.png: sha256 {sha(bytes(same_size))}, expected {sha(FILES['mask.png'])}"
    with pytest.raises(InputError, match=expected):
        fill(manifest, tmp_path)
    assert (folder / "mask.png").read_bytes() == bytes(same_size)


def test_several_files_download_in_parallel(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    server.barrier = threading.Barrier(4, timeout=20)  # all four requests must be open at the same time
    expect_folder(fill(manifest, tmp_path, jobs=4))
    assert len(server.requests) == 4


def test_a_folder_holds_one_version(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = fill(manifest, tmp_path)
    with pytest.raises(InputError, match="holds LatentSync 1.6"):
        ensure_weights(manifest, folder, "1.5")
    with pytest.raises(InputError, match="holds LatentSync 1.6"):
        ensure_weights(manifest, folder, "1.5")


# --- pget -----------------------------------------------------------------------------------------------------------

STUB = """#!{python}
# STAND-IN for Replicate's pget (written by tests/test_download.py): records how it was called, then fetches each
# `url dest` line of the manifest with urllib, the way `pget multifile` would.
import io, json, sys, tarfile, urllib.request
log = {log!r}
multifile = sys.argv[1] == "multifile"
lines = open(sys.argv[2]).read().split("\\n") if multifile else []
json.dump({{"argv": sys.argv[1:], "manifest": lines}}, open(log, "w"))
if {fail}:
    sys.exit(1)
if sys.argv[1] == "-x":  # pget -x URL DEST: download a tar and unpack it into DEST
    with urllib.request.urlopen(sys.argv[2]) as r:
        tarfile.open(fileobj=io.BytesIO(r.read())).extractall(sys.argv[3], filter="data")
    sys.exit(0)
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
    folder = fill(manifest, tmp_path)
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
        fill(manifest, tmp_path)
    assert not list(default_folder(tmp_path).glob("mask.png*"))


def test_failing_pget_falls_back_to_python(tmp_path, server, monkeypatch):
    log = install_stub_pget(tmp_path, monkeypatch, fail=True)
    manifest = write_manifest(tmp_path, server.base)
    expect_folder(fill(manifest, tmp_path))
    assert log.exists() and len(server.requests) == 4


# --- pre-filled folders (LATENTSYNC_WEIGHTS_DIR) and verification ---------------------------------------------------

def prefilled(folder: Path, version: str = "1.6") -> Path:
    """A folder filled by hand (no record, no lock), as a user or an image build would leave it."""
    unet = "unet16.pt" if version == "1.6" else "unet15.pt"
    for dest, name in [("latentsync_unet.pt", unet), ("whisper/tiny.pt", "tiny.pt"),
                       ("sd-vae-ft-mse/config.json", "vae.json"), ("mask.png", "mask.png")]:
        (folder / dest).parent.mkdir(parents=True, exist_ok=True)
        (folder / dest).write_bytes(FILES[name])
    return folder


def test_a_named_folder_is_verified_and_never_written_to(tmp_path, server, monkeypatch):
    manifest = write_manifest(tmp_path, server.base)
    folder = prefilled(tmp_path / "mine")
    (folder / "whisper/tiny.pt").unlink()
    before = snapshot(folder)
    monkeypatch.setenv("LATENTSYNC_WEIGHTS_DIR", str(tmp_path / "elsewhere"))  # the library reads no environment
    with pytest.raises(InputError, match=r"whisper/tiny\.pt: missing.*never downloaded into"):
        ensure_weights(manifest, folder, "1.6")
    assert snapshot(folder) == before  # no record, no lock, no partial file
    assert server.requests == []
    (folder / "whisper/tiny.pt").write_bytes(FILES["tiny.pt"])
    before = snapshot(folder)
    assert ensure_weights(manifest, folder, "1.6") == folder
    assert snapshot(folder) == before and server.requests == []


def test_a_wrong_file_in_a_named_folder_is_named_with_expected_and_found_and_kept(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = prefilled(tmp_path / "mine")
    (folder / "whisper/tiny.pt").write_bytes(b"x" * 10)
    with pytest.raises(InputError, match=rf"whisper/tiny\.pt: 10 bytes, expected {len(FILES['tiny.pt'])}"):
        ensure_weights(manifest, folder, "1.6")
    assert (folder / "whisper/tiny.pt").read_bytes() == b"x" * 10 and server.requests == []


def test_a_read_only_folder_is_verified(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    with read_only_tmpfs(tmp_path / "ro", prefilled) as folder:
        with pytest.raises(OSError):
            (folder / "probe").write_bytes(b"")
        assert ensure_weights(manifest, folder, "1.6") == folder
    assert server.requests == []


def test_verify_refuses_a_truncated_file(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base, sizes=False, shas=False)
    folder = fill(manifest, tmp_path)
    ensure_weights(manifest, folder, "1.6")
    with open(folder / "latentsync_unet.pt", "r+b") as f:  # sizes unknown to the manifest: the record knows them
        f.truncate(1000)
    with pytest.raises(InputError, match=r"latentsync_unet\.pt: 1000 bytes.*truncated"):
        ensure_weights(manifest, folder, "1.6")


def test_verify_refuses_a_sha256_mismatch_in_a_prefilled_folder(tmp_path, server):
    manifest = write_manifest(tmp_path, server.base)
    folder = tmp_path / "prefilled"
    for dest, name in [("latentsync_unet.pt", "unet16.pt"), ("whisper/tiny.pt", "tiny.pt"),
                       ("sd-vae-ft-mse/config.json", "vae.json"), ("mask.png", "mask.png")]:
        (folder / dest).parent.mkdir(parents=True, exist_ok=True)
        (folder / dest).write_bytes(FILES[name])
    ensure_weights(manifest, folder, "1.6")
    damaged = bytearray(FILES["mask.png"])
    damaged[100] ^= 0xFF
    (folder / "mask.png").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=r"mask\.png: sha256 [0-9a-f]{64}, expected"):
        ensure_weights(manifest, folder, "1.6")
    assert server.requests == []


# --- Hugging Face mirrors (HF_ENDPOINT) -------------------------------------------------------------------------

def test_hugging_face_urls_follow_the_endpoint_given(tmp_path, server):
    manifest = write_manifest(tmp_path, "https://huggingface.co")
    expect_folder(fill(manifest, tmp_path, endpoint=server.base + "/"))
    assert sorted(name for name, _ in server.requests) == ["mask.png", "tiny.pt", "unet16.pt", "vae.json"]
    assert manifest_mod.mirrored("https://example.com/a.pt", server.base) == "https://example.com/a.pt"


# --- archives ---------------------------------------------------------------------------------------------------------

def archive_manifest(tmp_path: Path, base: str, *, archive_sha: str | None = None, member_sha: dict | None = None,
                     urls: bool = False) -> Path:
    """Single-file lines without URLs (or with them) plus one 1.6 archive line holding them."""
    manifest = write_manifest(tmp_path, base, override=member_sha)
    lines = []
    for line in manifest.read_text().splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and not urls:
            fields[1] = "-"
        lines.append(" ".join(fields))
    tar = FILES["bundle16.tar"]
    lines.append(f"1.6 {base}/bundle16.tar ./ {len(tar)} {archive_sha or sha(tar)}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_an_archive_is_downloaded_checked_and_unpacked(tmp_path, server):
    folder = fill(archive_manifest(tmp_path, server.base), tmp_path)
    expect_folder(folder)
    assert [name for name, _ in server.requests] == ["bundle16.tar"]
    assert not (folder / "README.txt").exists()  # not in the manifest: not installed (and logged)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".latentsync-")) == [
        ".latentsync-weights.json", ".latentsync-weights.lock"]  # no staging folder or archive left


def test_an_archive_with_the_wrong_sha256_is_refused_before_unpacking(tmp_path, server):
    with pytest.raises(InputError, match=r"\./ from .*bundle16\.tar does not match.*sha256"):
        fill(archive_manifest(tmp_path, server.base, archive_sha="2" * 64), tmp_path)
    folder = default_folder(tmp_path)
    assert not (folder / "mask.png").exists()
    assert sorted(p.name for p in folder.iterdir()) == [".latentsync-weights.json", ".latentsync-weights.lock"]


def test_a_file_in_an_archive_must_match_its_own_line(tmp_path, server):
    manifest = archive_manifest(tmp_path, server.base, member_sha={"mask.png": "3" * 64})
    with pytest.raises(InputError, match=r"mask\.png in the archive .* sha256 [0-9a-f]{64}, expected 3{64}"):
        fill(manifest, tmp_path)
    assert not (default_folder(tmp_path) / "mask.png").exists()


def test_files_an_archive_lacks_come_from_their_own_urls(tmp_path, server):
    manifest = archive_manifest(tmp_path, server.base, urls=True)
    manifest.write_text(manifest.read_text().replace("unet16.pt latentsync_unet.pt", "unet16.pt extra/unet.pt"))
    folder = fill(manifest, tmp_path)
    assert (folder / "extra/unet.pt").read_bytes() == FILES["unet16.pt"]
    assert [name for name, _ in server.requests] == ["bundle16.tar", "unet16.pt"]


def test_an_archive_is_unpacked_by_pget_x_when_pget_is_installed(tmp_path, server, monkeypatch):
    log = install_stub_pget(tmp_path, monkeypatch)
    folder = fill(archive_manifest(tmp_path, server.base), tmp_path)
    expect_folder(folder)
    call = json.loads(log.read_text())
    assert call["argv"][:2] == ["-x", f"{server.base}/bundle16.tar"]
    assert Path(call["argv"][2]).parent.parent == folder  # a staging folder inside the weights folder, now gone
    assert not Path(call["argv"][2]).parent.exists()


# --- the same rule through the CLI (the entry point reads the environment) -----------------------------------------

SAMPLES = REPO / "samples"


def run_cli(tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    from latentsync.cli import main

    status = main([str(SAMPLES / "face.mp4"), str(SAMPLES / "speech.wav"), "-o", str(tmp_path / "out.mp4"), *extra])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("how", ["--weights-dir", "LATENTSYNC_WEIGHTS_DIR"])
def test_cli_verifies_a_named_folder_and_keeps_a_wrong_file(tmp_path, server, monkeypatch, capsys, how):
    manifest = write_manifest(tmp_path, server.base)
    folder = prefilled(tmp_path / "mine")
    (folder / "mask.png").write_bytes(b"a user's own mask")
    before = snapshot(folder)
    monkeypatch.setenv("LATENTSYNC_MANIFEST", str(manifest))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["--weights-dir", str(folder)] if how == "--weights-dir" else []
    if how == "LATENTSYNC_WEIGHTS_DIR":
        monkeypatch.setenv("LATENTSYNC_WEIGHTS_DIR", str(folder))
    status, err = run_cli(tmp_path, capsys, *args)
    assert status == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "mask.png: 17 bytes, expected 1871" in line, err
    assert snapshot(folder) == before and server.requests == []
    assert not (tmp_path / "cache").exists()  # nothing went to the default folder either


def test_cli_without_a_folder_fills_the_default_one(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("LATENTSYNC_MANIFEST", str(write_manifest(tmp_path, "https://huggingface.co")))
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    status, err = run_cli(tmp_path, capsys)
    expect_folder(default_folder(tmp_path))  # downloaded through the mirror and checked
    assert status == 2 and "latentsync_unet.pt" in err  # the served bytes are random: loading them is refused
