"""Weights on disk: the manifest (``weights.txt``), downloading what is missing, verifying what is there.

A weights folder holds the files of ONE LatentSync version under upstream's ``checkpoints/`` names
(``latentsync_unet.pt``, ``whisper/tiny.pt``, ``stable_syncnet.pt``, ``sd-vae-ft-mse/``, ``mask.png``); the 1.5
and 1.6 manifest lines share those names and the version asked for picks the line. The folder records its
version and what was verified in ``.latentsync-weights.json`` and refuses to be refilled with another version.

Environment: ``LATENTSYNC_WEIGHTS_DIR`` names a pre-filled folder (baked weights, tests): it is verified, never
downloaded into. ``LATENTSYNC_VERSION`` picks 1.5 or 1.6 (default 1.6). ``LATENTSYNC_MANIFEST`` replaces
``weights.txt``.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from latentsync.errors import InputError

log = logging.getLogger(__name__)

VERSIONS = ("1.5", "1.6")
DEFAULT_VERSION = "1.6"
MANIFEST = Path(__file__).resolve().parent.parent / "weights.txt"
RECORD_NAME = ".latentsync-weights.json"
LOCK_NAME = ".latentsync-weights.lock"

RETRIES = 5  # tries per file; each one resumes the partial file with an HTTP Range request
RETRY_WAIT_S = 2.0  # times the try number, between tries
TIMEOUT_S = 60.0  # per socket operation, not per file
JOBS = 4  # files downloaded at once by the Python downloader
CHUNK = 1 << 20
PROGRESS_EVERY_S = 15.0
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class WeightFile:
    """One manifest line: which version needs it, where it comes from and goes, and what it must be."""

    version: str  # "1.5", "1.6" or "all"
    url: str
    dest: str  # relative to the weights folder, "/"-separated
    size: int | None = None
    sha256: str | None = None


class _Incomplete(Exception):
    """The connection ended before the whole file arrived: worth another (resumed) try."""


def read_manifest(path: str | Path | None = None) -> list[WeightFile]:
    """Parse a weights manifest (``$LATENTSYNC_MANIFEST`` or ``weights.txt`` by default); bad lines are errors."""
    path = Path(path or os.environ.get("LATENTSYNC_MANIFEST") or MANIFEST)
    if not path.is_file():
        raise InputError(f"weights manifest not found: {path}")
    entries: list[WeightFile] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise InputError(f"{where}: expected `version url dest size sha256`, got {len(fields)} fields")
        version, url, dest, size, sha = fields
        if version not in (*VERSIONS, "all"):
            raise InputError(f"{where}: version {version!r} is not one of {', '.join(VERSIONS)} or all")
        if not re.match(r"https?://", url):
            raise InputError(f"{where}: {url!r} is not an http(s) URL")
        rel = PurePosixPath(dest)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise InputError(f"{where}: destination {dest!r} must stay inside the weights folder")
        if size != "-" and not size.isdigit():
            raise InputError(f"{where}: size {size!r} is neither a byte count nor -")
        if sha != "-" and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            raise InputError(f"{where}: sha256 {sha!r} is neither 64 hex digits nor -")
        entries.append(WeightFile(version, url, str(rel), None if size == "-" else int(size),
                                  None if sha == "-" else sha.lower()))
    return entries


def resolve_version(version: str | None = None) -> str:
    """The version asked for, else ``$LATENTSYNC_VERSION``, else 1.6; anything else is an error."""
    version = str(version or os.environ.get("LATENTSYNC_VERSION") or DEFAULT_VERSION).strip()
    if version not in VERSIONS:
        raise InputError(f"LatentSync version {version!r} is not one of {', '.join(VERSIONS)}")
    return version


def files_for(manifest: Sequence[WeightFile], version: str) -> list[WeightFile]:
    """The manifest lines one version needs; two lines for one destination are an error."""
    version = resolve_version(version)
    chosen: dict[str, WeightFile] = {}
    for entry in manifest:
        if entry.version in (version, "all"):
            if entry.dest in chosen:
                raise InputError(f"the weights manifest lists {entry.dest} twice for version {version}")
            chosen[entry.dest] = entry
    if not chosen:
        raise InputError(f"the weights manifest has no files for version {version}")
    return list(chosen.values())


def default_weights_dir(version: str) -> Path:
    """Where downloads go when no folder is named: ``$XDG_CACHE_HOME/latentsync/<version>`` (or ``~/.cache``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "latentsync" / version


def ensure_weights(manifest: str | Path | Sequence[WeightFile] | None = None, weights_dir: str | Path | None = None,
                   version: str | None = None, *, download: bool | None = None, jobs: int = JOBS) -> Path:
    """Make ``weights_dir`` hold every file of ``version``: keep valid files, fetch the rest; returns the folder.

    ``weights_dir`` defaults to ``$LATENTSYNC_WEIGHTS_DIR`` (then nothing is downloaded, only verified), else
    :func:`default_weights_dir`. ``download=False`` only verifies. A size or sha256 mismatch is an InputError
    naming the file; a network failure is a RuntimeError naming the file and URL.
    """
    version = resolve_version(version)
    prefilled = os.environ.get("LATENTSYNC_WEIGHTS_DIR")
    if weights_dir is None and prefilled:
        weights_dir = prefilled
        download = False if download is None else download
    folder = Path(weights_dir) if weights_dir is not None else default_weights_dir(version)
    download = True if download is None else download
    entries = files_for(manifest if isinstance(manifest, Sequence) and not isinstance(manifest, str)
                        else read_manifest(manifest), version)

    if not download:
        if not folder.is_dir():
            raise InputError(f"weights folder not found: {folder}")
        record = _Record.load(folder)
        record.check_version(version)
        problems = {e.dest: p for e in entries if (p := _problem(e, folder / e.dest, record))}
        if problems:
            detail = "; ".join(f"{dest}: {p}" for dest, p in problems.items())
            raise InputError(f"weights folder {folder} is incomplete or damaged: {detail}")
        log.info("weights for LatentSync %s verified in %s (%d files)", version, folder, len(entries))
        return folder

    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        record = _Record.load(folder)
        record.check_version(version)
        record.version = version
        record.save(folder)  # claim the folder for this version before any file of it arrives
        todo = []
        for entry in entries:
            path = folder / entry.dest
            problem = _problem(entry, path, record)
            if problem is None:
                continue
            if path.exists():
                log.warning("re-downloading %s: %s", entry.dest, problem)
                path.unlink()
            todo.append(entry)
        started = time.monotonic()
        try:
            if todo:
                left = _download_with_pget(todo, folder) if shutil.which("pget") else todo
                _download_with_python(left, folder, jobs)
                log.info("downloaded %d weight files into %s in %.1f s", len(todo), folder,
                         time.monotonic() - started)
        finally:
            for entry in todo:
                if (folder / entry.dest).is_file():  # only verified files are ever moved into place
                    record.remember(entry, folder / entry.dest)
            record.save(folder)
    log.info("weights for LatentSync %s ready in %s", version, folder)
    return folder


def verify_weights(weights_dir: str | Path, version: str | None = None,
                   manifest: str | Path | Sequence[WeightFile] | None = None) -> Path:
    """Check a filled weights folder without touching the network: missing, truncated or altered files are errors."""
    return ensure_weights(manifest, weights_dir, version, download=False)


# --- what is on disk ------------------------------------------------------------------------------------------------

@dataclass
class _Record:
    """The folder's memory: its version, and the size/mtime/sha256 of the files it verified."""

    version: str | None
    files: dict[str, dict]

    @classmethod
    def load(cls, folder: Path) -> _Record:
        try:
            data = json.loads((folder / RECORD_NAME).read_text())
            return cls(data.get("version"), dict(data.get("files", {})))
        except (OSError, ValueError, AttributeError):
            return cls(None, {})

    def check_version(self, version: str) -> None:
        if self.version and self.version != version:
            raise InputError(f"this weights folder holds LatentSync {self.version} weights, not {version}; "
                             f"use one folder per version")

    def remember(self, entry: WeightFile, path: Path) -> None:
        stat = path.stat()
        self.files[entry.dest] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": entry.sha256}

    def save(self, folder: Path) -> None:
        data = json.dumps({"version": self.version, "files": self.files}, indent=1, sort_keys=True)
        staged = folder / f"{RECORD_NAME}.{os.getpid()}.tmp"
        staged.write_text(data)
        os.replace(staged, folder / RECORD_NAME)


def _problem(entry: WeightFile, path: Path, record: _Record) -> str | None:
    """Why the file at ``path`` is not a valid copy of ``entry`` (None when it is)."""
    if not path.is_file():
        return "missing"
    stat = path.stat()
    seen = record.files.get(entry.dest, {})
    expected = entry.size if entry.size is not None else seen.get("size")
    if expected is not None and stat.st_size != expected:
        return f"{stat.st_size} bytes, expected {expected} (truncated or incomplete)"
    if entry.sha256 is None:
        return None
    if seen.get("sha256") == entry.sha256 and seen.get("size") == stat.st_size \
            and seen.get("mtime_ns") == stat.st_mtime_ns:
        return None  # verified earlier and untouched since
    digest = _sha256(path)
    if digest != entry.sha256:
        return f"sha256 {digest}, expected {entry.sha256}"
    record.remember(entry, path)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 8):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One downloader per folder at a time (two workers starting together would write the same files)."""
    with open(folder / LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finish(entry: WeightFile, partial: Path, path: Path) -> None:
    """Check a complete download against the manifest, then move it into place atomically."""
    problem = _problem(entry, partial, _Record(None, {}))
    if problem is not None:
        partial.unlink(missing_ok=True)
        raise InputError(f"downloaded {entry.dest} from {entry.url} does not match the weights manifest: {problem}; "
                         f"refused and deleted")
    os.replace(partial, path)


# --- downloading ----------------------------------------------------------------------------------------------------

def _download_with_pget(entries: list[WeightFile], folder: Path) -> list[WeightFile]:
    """Fetch with Replicate's ``pget multifile`` (parallel chunks); returns the entries it did not deliver."""
    if any(re.search(r"\s", str(folder / e.dest)) for e in entries):
        return entries  # pget's manifest is split on whitespace
    targets = {e.dest: (folder / e.dest).with_name(Path(e.dest).name + ".pget") for e in entries}
    with tempfile.TemporaryDirectory(prefix="latentsync-pget-") as tmp:
        listing = Path(tmp) / "manifest.txt"
        lines = []
        for entry in entries:
            target = targets[entry.dest]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # pget refuses to overwrite
            lines.append(f"{entry.url} {target}")
        listing.write_text("\n".join(lines) + "\n")
        log.info("downloading %d weight files with pget", len(entries))
        proc = subprocess.run([shutil.which("pget") or "pget", "multifile", str(listing)], check=False)
    if proc.returncode != 0:
        log.warning("pget failed (exit status %d); downloading the rest with Python", proc.returncode)
    left = []
    for entry in entries:
        target = targets[entry.dest]
        if proc.returncode == 0 and target.is_file():
            _finish(entry, target, folder / entry.dest)
        else:
            target.unlink(missing_ok=True)
            left.append(entry)
    return left


def _download_with_python(entries: list[WeightFile], folder: Path, jobs: int) -> None:
    """Fetch files in parallel threads; a checksum refusal wins over other errors when several fail."""
    if not entries:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(entries)))) as pool:
        futures = [pool.submit(_download_one, e, folder / e.dest) for e in entries]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, InputError)), errors[0])


def _download_one(entry: WeightFile, path: Path) -> None:
    """One file: resume ``<dest>.part`` across tries, then verify and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch(entry, partial)
            break
        except urllib.error.HTTPError as e:
            if e.code not in RETRYABLE_HTTP or attempt == RETRIES:
                raise RuntimeError(f"could not download {entry.dest} from {entry.url}: HTTP {e.code} {e.reason}") from e
            reason = f"HTTP {e.code}"
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if attempt == RETRIES:
                raise RuntimeError(f"could not download {entry.dest} from {entry.url} after {RETRIES} tries: "
                                   f"{e}") from e
            reason = str(e) or type(e).__name__
        log.warning("%s: try %d of %d failed (%s); resuming", entry.dest, attempt, RETRIES, reason)
        time.sleep(RETRY_WAIT_S * attempt)
    _finish(entry, partial, path)


def _fetch(entry: WeightFile, partial: Path) -> None:
    """Append the rest of ``entry`` to ``partial`` (a Range request when it has bytes already)."""
    offset = partial.stat().st_size if partial.exists() else 0
    if entry.size is not None and offset > entry.size:
        partial.unlink()
        offset = 0
    if entry.size is not None and offset == entry.size:
        return
    request = urllib.request.Request(entry.url, headers={"User-Agent": "latentsync-weights/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Nothing past our end: the partial file is complete when the server's total agrees, else junk.
        total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if total.isdigit() and int(total) == offset:
            return
        partial.unlink()
        raise _Incomplete("the partial file does not fit the server's copy; starting over") from e
    with response:
        resumed = offset and response.status == 206 and \
            (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-")
        if not resumed:
            offset = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if entry.size is not None and total is not None and total != entry.size:
            partial.unlink(missing_ok=True)
            raise InputError(f"{entry.url} serves {total} bytes for {entry.dest}, the weights manifest expects "
                             f"{entry.size}; refused")
        if offset:
            log.info("%s: resuming at %.1f MB", entry.dest, offset / 1e6)
        else:
            log.info("%s: downloading%s", entry.dest, f" {total / 1e6:.1f} MB" if total else "")
        done, started, last_report = offset, time.monotonic(), time.monotonic()
        with open(partial, "ab" if offset else "wb") as out:
            while block := response.read(CHUNK):
                out.write(block)
                done += len(block)
                if time.monotonic() - last_report > PROGRESS_EVERY_S:
                    last_report = time.monotonic()
                    share = f" ({100 * done / total:.0f}%)" if total else ""
                    log.info("%s: %.1f MB%s", entry.dest, done / 1e6, share)
    if total is not None and done != total:
        raise _Incomplete(f"connection ended after {done} of {total} bytes")
    elapsed = max(time.monotonic() - started, 1e-6)
    log.info("%s: done, %.1f MB at %.1f MB/s", entry.dest, done / 1e6, (done - offset) / 1e6 / elapsed)
