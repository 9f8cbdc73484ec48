"""The weights manifest (``weights.txt``): the files each LatentSync version needs, where from, their size and sha256.

One line per file: ``version url dest size sha256`` (``-`` where unknown; version ``all`` for files every version
shares). A destination ending in ``/`` is an archive (a ``.tar``/``.tar.gz``) unpacked there; a file that only an
archive provides has the URL ``-``. Fetching and verifying is ``latentsync.download``'s.

A weights folder holds the files of ONE LatentSync version under upstream's ``checkpoints/`` names
(``latentsync_unet.pt``, ``whisper/tiny.pt``, ``stable_syncnet.pt``, ``sd-vae-ft-mse/``, ``mask.png``); the 1.5
and 1.6 manifest lines share those names and the version asked for picks the line. A folder of other weights
may carry its own manifest, ``weights.txt`` beside the files it lists (:data:`FOLDER_MANIFEST`); a folder the
caller names is then checked against it instead of the shipped one.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from latentsync.config import data_path, folder_file
from latentsync.errors import InputError
from latentsync.options import DEFAULT_VERSION, check_version

HF_HOST = "https://huggingface.co/"
FOLDER_MANIFEST = "weights.txt"  # a weights folder's own manifest, when it has one


@dataclass(frozen=True)
class WeightFile:
    """One manifest line: which version needs it, where it comes from and goes, and what it must be.

    ``url`` is None for a file that only an archive line provides; ``dest`` ending in ``/`` marks an archive.
    """

    version: str  # "1.5", "1.6" or "all"
    url: str | None
    dest: str  # relative to the weights folder, "/"-separated
    size: int | None = None
    sha256: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.dest.endswith("/")


def manifest_path() -> Path:
    """The manifest shipped with the package (``weights.txt``)."""
    return data_path("weights.txt")


def folder_manifest(weights_dir: str | Path | None) -> Path | None:
    """The manifest a weights folder carries for itself (``weights.txt`` in it), None when it has none."""
    return folder_file(weights_dir, FOLDER_MANIFEST)


def read_manifest(path: str | Path | None = None) -> list[WeightFile]:
    """Parse a weights manifest (the shipped ``weights.txt`` by default); a bad line is an error naming it."""
    path = Path(path) if path else manifest_path()
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
        check_version(version, f"{where}: version", also=("all",))
        if url != "-" and not re.match(r"https?://", url):
            raise InputError(f"{where}: {url!r} is not an http(s) URL")
        archive = dest.endswith("/")
        rel = PurePosixPath(dest)
        if rel.is_absolute() or ".." in rel.parts or (not rel.parts and not archive):
            raise InputError(f"{where}: destination {dest!r} must stay inside the weights folder")
        if archive and url == "-":
            raise InputError(f"{where}: an archive line needs a URL")
        if size != "-" and not size.isdigit():
            raise InputError(f"{where}: size {size!r} is neither a byte count nor -")
        if sha != "-" and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
            raise InputError(f"{where}: sha256 {sha!r} is neither 64 hex digits nor -")
        if archive:
            dest = "./" if not rel.parts else f"{rel}/"  # "./": unpacked into the weights folder itself
        else:
            dest = str(rel)
        entries.append(WeightFile(version, None if url == "-" else url, dest, None if size == "-" else int(size),
                                  None if sha == "-" else sha.lower()))
    return entries


def resolve_version(version: str | None = None) -> str:
    """The version asked for, else 1.6; anything else is an error listing the versions."""
    return check_version(version or DEFAULT_VERSION)


def files_for(manifest: Sequence[WeightFile], version: str) -> list[WeightFile]:
    """The single-file manifest lines one version needs; two lines for one destination are an error."""
    version = resolve_version(version)
    chosen: dict[str, WeightFile] = {}
    for entry in manifest:
        if entry.version in (version, "all") and not entry.is_archive:
            if entry.dest in chosen:
                raise InputError(f"the weights manifest lists {entry.dest} twice for version {version}")
            chosen[entry.dest] = entry
    if not chosen:
        raise InputError(f"the weights manifest has no files for version {version}")
    return list(chosen.values())


def archives_for(manifest: Sequence[WeightFile], version: str) -> list[WeightFile]:
    """The archive lines of one version (tried, in manifest order, before single-file downloads)."""
    return [e for e in manifest if e.is_archive and e.version in (resolve_version(version), "all")]


def default_weights_dir(version: str, cache_home: str | Path | None = None) -> Path:
    """The one folder downloads go to: ``<cache_home>/latentsync/<version>`` (``cache_home``: ``~/.cache``)."""
    return Path(cache_home or Path.home() / ".cache") / "latentsync" / resolve_version(version)


def mirrored(url: str, endpoint: str | None) -> str:
    """``url`` served by a Hugging Face mirror (``HF_ENDPOINT``) instead of huggingface.co; other hosts unchanged."""
    if not endpoint or not url.startswith(HF_HOST):
        return url
    return endpoint.rstrip("/") + "/" + url.removeprefix(HF_HOST)
