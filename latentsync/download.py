"""Weights on disk: downloading what the manifest lists and the folder lacks, verifying what is there.

One rule for every front door: a folder the caller names is only verified (never written to, so it may be read-only);
only the default folder (:func:`default_weights_dir`) is downloaded into. A file that does not match the manifest is
reported and left alone, wherever it is; only partial downloads this module started are ever removed.

Manifest lines are single files, or archives (a destination ending in ``/``): a ``.tar``/``.tar.gz`` fetched with
``pget -x`` when pget is installed (else by Python, then checked against its own size/sha256) and unpacked; every file
taken from it is checked against its own manifest line before it is moved into place. No environment is read here.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from latentsync.errors import InputError, ResourceError
from latentsync.manifest import (
    WeightFile,
    archives_for,
    default_weights_dir,
    files_for,
    folder_manifest,
    mirrored,
    read_manifest,
    resolve_version,
)

log = logging.getLogger(__name__)

RECORD_NAME = ".latentsync-weights.json"
LOCK_NAME = ".latentsync-weights.lock"
UNPACK_PREFIX = ".latentsync-unpack-"  # staging folders for archives: ours, removed after use (or at the next run)

RETRIES = 5  # tries per file; each one resumes the partial file with an HTTP Range request
RETRY_WAIT_S = 2.0  # times the try number, between tries
TIMEOUT_S = 60.0  # per socket operation, not per file
JOBS = 4  # files downloaded at once by the Python downloader
CHUNK = 1 << 20
PROGRESS_EVERY_S = 15.0
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Incomplete(Exception):
    """The connection ended before the whole file arrived: worth another (resumed) try."""


# --- the one entry point --------------------------------------------------------------------------------------------

def ensure_weights(manifest: str | Path | Sequence[WeightFile] | None = None, weights_dir: str | Path | None = None,
                   version: str | None = None, *, endpoint: str | None = None, cache_home: str | Path | None = None,
                   download_dir: str | Path | None = None, jobs: int = JOBS) -> Path:
    """The weights folder of ``version``, checked against the manifest; returns it.

    ``weights_dir`` given: only verified, nothing written or fetched (it may be read-only), by default against its
    own ``weights.txt`` if it has one. None: :func:`default_weights_dir` is filled from the network (``endpoint``
    replaces huggingface.co, e.g. ``$HF_ENDPOINT``); ``download_dir``: another folder to fill (Cog: beside predict.py).
    Missing or mismatching files are an ``InputError`` naming each one (a mismatching file is never removed); an
    unreachable server is a ``ResourceError`` naming the file and URL.
    """
    version = resolve_version(version)
    manifest = folder_manifest(weights_dir) if manifest is None else manifest  # None there: the shipped one
    lines = list(manifest) if isinstance(manifest, Sequence) and not isinstance(manifest, str) \
        else read_manifest(manifest)
    entries = files_for(lines, version)
    if weights_dir is not None:
        return _verify(Path(weights_dir), version, entries)
    folder = Path(download_dir) if download_dir is not None else default_weights_dir(version, cache_home)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            _fill(folder, version, entries, archives_for(lines, version), endpoint, jobs)
    except OSError as e:  # the folder itself (permissions, a full disk while staging): the machine, not the input
        raise ResourceError(f"cannot write to the weights folder {folder}: {e.strerror or e}") from e
    log.info("weights for LatentSync %s ready in %s", version, folder)
    return folder


def _verify(folder: Path, version: str, entries: list[WeightFile]) -> Path:
    if not folder.is_dir():
        raise InputError(f"weights folder not found: {folder}")
    record = _Record.load(folder)
    record.check_version(version)
    problems = {e.dest: p for e in entries if (p := _problem(e, folder / e.dest, record))}
    if problems:
        detail = "; ".join(f"{dest}: {p}" for dest, p in problems.items())
        raise InputError(f"weights folder {folder} is incomplete or damaged: {detail} (a folder you name is only "
                         f"checked, never downloaded into; fix or replace these files)")
    log.info("weights for LatentSync %s verified in %s (%d files)", version, folder, len(entries))
    return folder


def _fill(folder: Path, version: str, entries: list[WeightFile], archives: list[WeightFile],
          endpoint: str | None, jobs: int) -> None:
    """Download what the default folder lacks; refuse (and keep) files that are there but wrong."""
    for stale in folder.glob(UNPACK_PREFIX + "*"):  # left by a run that was killed mid-unpack
        shutil.rmtree(stale, ignore_errors=True)
    record = _Record.load(folder)
    record.check_version(version)
    record.version = version
    record.save(folder)  # claim the folder for this version before any file of it arrives
    todo, wrong = [], {}
    for entry in entries:
        problem = _problem(entry, folder / entry.dest, record)
        if problem == "missing":
            todo.append(entry)
        elif problem is not None:
            wrong[entry.dest] = problem
    if wrong:
        detail = "; ".join(f"{dest}: {p}" for dest, p in wrong.items())
        raise InputError(f"weights folder {folder} holds files that do not match the weights manifest: {detail}; "
                         f"they were left untouched: move them away to download fresh copies")
    started = time.monotonic()
    try:
        for archive in archives:
            if todo:
                todo = _from_archive(archive, todo, folder, endpoint, record)
        unreachable = [e.dest for e in todo if e.url is None]
        if unreachable:
            raise InputError(f"the weights manifest gives no URL for {', '.join(unreachable)} and no archive "
                             f"provided it")
        if todo:
            left = _download_with_pget(todo, folder, endpoint) if shutil.which("pget") else todo
            _download_with_python(left, folder, endpoint, jobs)
            log.info("downloaded %d weight files into %s in %.1f s", len(todo), folder, time.monotonic() - started)
    finally:
        for entry in entries:
            if entry.dest not in record.files and (folder / entry.dest).is_file():
                record.remember(entry, folder / entry.dest)  # only verified files are ever moved into place
        record.save(folder)


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
    """Why the file at ``path`` is not a valid copy of ``entry`` (None when it is): found vs expected."""
    if not path.is_file():
        return "missing"
    stat = path.stat()
    seen = record.files.get(entry.dest, {})
    expected = entry.size if entry.size is not None else seen.get("size")
    if expected is not None and stat.st_size != expected:
        return f"{stat.st_size} bytes, expected {expected} (truncated, incomplete or another file)"
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
    """Check a complete download (ours) against the manifest, then move it into place atomically."""
    problem = _problem(entry, partial, _Record(None, {}))
    if problem is not None:
        partial.unlink(missing_ok=True)
        raise InputError(f"downloaded {entry.dest} from {entry.url} does not match the weights manifest: {problem}; "
                         f"refused (the download was deleted)")
    os.replace(partial, path)


# --- archives -------------------------------------------------------------------------------------------------------

def _from_archive(archive: WeightFile, todo: list[WeightFile], folder: Path, endpoint: str | None,
                  record: _Record) -> list[WeightFile]:
    """Fetch and unpack one archive into a staging folder, move the verified files ``todo`` needs; return the rest."""
    url = mirrored(archive.url or "", endpoint)
    staging = Path(tempfile.mkdtemp(prefix=UNPACK_PREFIX, dir=folder))
    try:
        unpacked, target = False, staging / "files"
        if shutil.which("pget"):
            # pget unpacks while it downloads: the archive itself is never on disk, each file is checked below.
            log.info("downloading and unpacking %s with pget", url)
            proc = subprocess.run([shutil.which("pget") or "pget", "-x", url, str(target)], check=False)
            unpacked = proc.returncode == 0 and target.is_dir()
            if not unpacked:
                log.warning("pget -x failed (exit status %d); downloading the archive with Python", proc.returncode)
                shutil.rmtree(target, ignore_errors=True)
        if not unpacked:
            # A fixed name beside the folder's files, so a cut download resumes at the next start.
            tar_path = folder / f".latentsync-archive-{PurePosixPath(archive.url or 'weights').name}"
            _download_one(archive, tar_path, endpoint)  # checked against the archive line's size and sha256
            _unpack(tar_path, target)
            tar_path.unlink()
        base = PurePosixPath(archive.dest)  # "./" → "." : relative_to(".") keeps the whole path
        left, extra = [], {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
        for entry in todo:
            rel = PurePosixPath(entry.dest)
            inside = str(rel.relative_to(base)) if rel.is_relative_to(base) else None
            if inside is None or not (target / inside).is_file():
                left.append(entry)
                continue
            extra.discard(inside)
            problem = _problem(entry, target / inside, _Record(None, {}))
            if problem is not None:
                raise InputError(f"{entry.dest} in the archive {url} does not match the weights manifest: {problem}; "
                                 f"refused")
            (folder / entry.dest).parent.mkdir(parents=True, exist_ok=True)
            os.replace(target / inside, folder / entry.dest)
            record.remember(entry, folder / entry.dest)
        if extra:
            log.warning("archive %s: %d files not in the weights manifest were not installed: %s", url, len(extra),
                        ", ".join(sorted(extra)[:5]))
        log.info("archive %s gave %d of %d missing files", url, len(todo) - len(left), len(todo))
        return left
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(tar_path: Path, target: Path) -> None:
    """Unpack a (compressed) tar into ``target``; links, devices and paths leaving it are refused by the data filter."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot unpack the weights archive: {e}") from e


# --- downloading single files ---------------------------------------------------------------------------------------

def _download_with_pget(entries: list[WeightFile], folder: Path, endpoint: str | None) -> list[WeightFile]:
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
            target.unlink(missing_ok=True)  # ours from an earlier try; pget refuses to overwrite
            lines.append(f"{mirrored(entry.url or '', endpoint)} {target}")
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


def _download_with_python(entries: list[WeightFile], folder: Path, endpoint: str | None, jobs: int) -> None:
    """Fetch files in parallel threads; a checksum refusal wins over other errors when several fail."""
    if not entries:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(entries)))) as pool:
        futures = [pool.submit(_download_one, e, folder / e.dest, endpoint) for e in entries]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, InputError)), errors[0])


def _download_one(entry: WeightFile, path: Path, endpoint: str | None = None) -> None:
    """One file: resume ``<dest>.part`` across tries, then verify and rename it into place."""
    url = mirrored(entry.url or "", endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    for attempt in range(1, RETRIES + 1):
        try:
            _fetch(entry, url, partial)
            break
        except urllib.error.HTTPError as e:
            if e.code not in RETRYABLE_HTTP or attempt == RETRIES:
                raise ResourceError(f"could not download {entry.dest} from {url}: HTTP {e.code} {e.reason}") from e
            reason = f"HTTP {e.code}"
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # another try would not help; the part is kept
                need = f" ({entry.size / 1e9:.1f} GB needed)" if entry.size else ""
                raise ResourceError(f"no space left in {path.parent} while downloading {entry.dest}{need}; free some "
                                    f"space and start again: the download resumes") from e
            if attempt == RETRIES:
                raise ResourceError(f"could not download {entry.dest} from {url} after {RETRIES} tries: {e}") from e
            reason = str(e) or type(e).__name__
        log.warning("%s: try %d of %d failed (%s); resuming", entry.dest, attempt, RETRIES, reason)
        time.sleep(RETRY_WAIT_S * attempt)
    _finish(entry, partial, path)


def _fetch(entry: WeightFile, url: str, partial: Path) -> None:
    """Append the rest of ``entry`` to ``partial`` (a Range request when it has bytes already)."""
    offset = partial.stat().st_size if partial.exists() else 0
    if entry.size is not None and offset > entry.size:
        partial.unlink()
        offset = 0
    if entry.size is not None and offset == entry.size:
        return
    request = urllib.request.Request(url, headers={"User-Agent": "latentsync-weights/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # Nothing past our end: the partial file is complete when the server's total agrees, else junk.
        server_size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if server_size.isdigit() and int(server_size) == offset:
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
            raise InputError(f"{url} serves {total} bytes for {entry.dest}, the weights manifest expects "
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
