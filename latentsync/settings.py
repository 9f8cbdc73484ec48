"""What a front door needs to load the models, from the environment and its flags: one frozen :class:`Settings`.

The CLI, the batch command and ``predict.py`` all read their settings here, so a variable means the same thing
whatever the door; the environment itself is read only by them (they pass ``os.environ`` in). A flag wins over its
variable:

``LATENTSYNC_WEIGHTS_DIR`` (``--weights-dir``): a filled weights folder, verified and never downloaded into;
unset: ``$XDG_CACHE_HOME/latentsync/VERSION``, filled from the network (``HF_ENDPOINT``: a Hugging Face mirror).
``LATENTSYNC_VERSION`` (``--version``), ``LATENTSYNC_MANIFEST`` (another manifest than ``weights.txt``),
``LATENTSYNC_UNET_CONFIG`` / ``LATENTSYNC_SYNCNET_CONFIG`` (``--unet-config`` / ``--syncnet-config``),
``LATENTSYNC_COMPILE=1`` (``--compile``), ``LATENTSYNC_MAX_SIDE`` / ``LATENTSYNC_MAX_DURATION`` (input caps).

A weights folder that is named may describe itself: its own ``weights.txt``, ``unet.yaml`` and ``syncnet.yaml``
take the place of the shipped manifest and configs, each where no flag or variable names one.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentsync import download, media
from latentsync.config import FOLDER_SYNCNET_CONFIG, FOLDER_UNET_CONFIG, folder_file, load_config
from latentsync.errors import InputError, ResourceError, one_line
from latentsync.hardware import check_device
from latentsync.manifest import folder_manifest
from latentsync.options import DEFAULT_VERSION, DTYPES, VERSIONS, check_version

if TYPE_CHECKING:
    from latentsync.pipeline import LipSync


@dataclass(frozen=True)
class Settings:
    """Where the weights come from and how the models load; every path checked and absolute."""

    weights_dir: Path | None  # None: the default folder, filled from the network
    version: str = DEFAULT_VERSION
    manifest: Path | tuple | None = None  # None: the shipped weights.txt; a tuple: its parsed lines
    endpoint: str | None = None  # HF_ENDPOINT
    cache_home: str | None = None  # XDG_CACHE_HOME
    download_dir: Path | None = None  # the folder to fill instead of the default one (Cog: beside predict.py)
    unet_config: Path | None = None
    syncnet_config: Path | None = None
    device: str | None = None  # None: CUDA when present
    dtype: str | None = None  # None: by device
    compile: bool = False
    caps: media.MediaCaps = media.MediaCaps()  # the input caps; read from the environment by read()

    @classmethod
    def read(cls, environ: Mapping[str, str], *, weights_dir: str | Path | None = None, version: str | None = None,
             unet_config: str | Path | None = None, syncnet_config: str | Path | None = None,
             device: str | None = None, dtype: str | None = None, compile: bool = False,
             download_home: Path | None = None) -> Settings:
        """Settings from the flags given (None: not given) and ``environ``; a bad value is an ``InputError``
        naming the flag or the variable it came from. ``download_home``: fill ``download_home/VERSION`` instead of
        the default cache folder when no weights folder is named."""
        named = _pick(weights_dir, "--weights-dir", environ, "LATENTSYNC_WEIGHTS_DIR")
        chosen = _pick(version, "--version", environ, "LATENTSYNC_VERSION")
        compiled = environ.get("LATENTSYNC_COMPILE", "").strip()
        if compiled not in ("", "0", "1"):
            raise InputError(f"LATENTSYNC_COMPILE must be 1 or 0, got {compiled!r}")
        folder = Path(named[0]).expanduser().resolve() if named else None
        # The folder's own files describe it unless the caller named others; the default folder holds none.
        manifest = Path(environ["LATENTSYNC_MANIFEST"]) if environ.get("LATENTSYNC_MANIFEST") \
            else folder_manifest(folder)
        version = check_version(*chosen) if chosen else DEFAULT_VERSION
        return cls(weights_dir=folder, version=version,
                   download_dir=Path(download_home) / version if download_home is not None else None,
                   manifest=manifest, endpoint=environ.get("HF_ENDPOINT") or None,
                   cache_home=environ.get("XDG_CACHE_HOME") or None,
                   unet_config=_config(unet_config, "--unet-config", environ, "LATENTSYNC_UNET_CONFIG",
                                       folder_file(folder, FOLDER_UNET_CONFIG)),
                   syncnet_config=_config(syncnet_config, "--syncnet-config", environ, "LATENTSYNC_SYNCNET_CONFIG",
                                          folder_file(folder, FOLDER_SYNCNET_CONFIG)),
                   device=check_device(device), dtype=dtype, compile=bool(compile) or compiled == "1",
                   caps=media.caps_from_env(environ))

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        """Settings from the flags :func:`add_model_arguments` added, and ``environ``."""
        return cls.read(environ, weights_dir=args.weights_dir, version=args.version, unet_config=args.unet_config,
                        syncnet_config=args.syncnet_config, device=args.device, dtype=args.dtype,
                        compile=args.compile)

    def weights(self) -> Path:
        """Verify (a named folder) or fill (the default one) the weights folder; returns it."""
        manifest = list(self.manifest) if isinstance(self.manifest, Sequence) else self.manifest
        try:
            return download.ensure_weights(manifest, self.weights_dir, self.version, endpoint=self.endpoint,
                                  cache_home=self.cache_home, download_dir=self.download_dir)
        except RuntimeError as e:  # the network, not the input
            if isinstance(e, ResourceError):
                raise
            raise ResourceError(one_line(e)) from e

    def load(self, weights_dir: Path | None = None) -> LipSync:
        """The ``LipSync`` pipeline these settings describe (``weights_dir``: already verified by :meth:`weights`)."""
        # Imported here, not above: the CLI and the batch command check their input without torch.
        from latentsync.models.compiled import default_cache_root, remove_unused_inductor_folder
        from latentsync.pipeline import LipSync

        # A folder the user named is never written to: its compiled kernels go to the default cache folder.
        cache = default_cache_root(self.cache_home) if self.weights_dir is not None else None
        try:
            return LipSync.from_pretrained(weights_dir or self.weights(), version=self.version, device=self.device,
                                           dtype=self.dtype, unet_config=self.unet_config,
                                           syncnet_config=self.syncnet_config, compile=self.compile,
                                           caps=self.caps, compile_cache=cache)
        finally:
            remove_unused_inductor_folder()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose and load the models, shared by the CLI and the batch command (read back with
    :meth:`Settings.from_args`); each help ends with its default."""
    g = parser.add_argument_group("model")
    g.add_argument("--weights-dir", type=Path, default=None,
                   help="a filled folder laid out like upstream's checkpoints/, one version per folder: verified, "
                        "never downloaded into; its own weights.txt, unet.yaml and syncnet.yaml are used where "
                        "present (default: $LATENTSYNC_WEIGHTS_DIR, else ~/.cache/latentsync/VERSION, which is "
                        "filled from the network)")
    g.add_argument("--version", default=None, metavar="{" + ",".join(VERSIONS) + "}",
                   help="LatentSync version (1.5: 256-px crops, 1.6: 512-px) (default: $LATENTSYNC_VERSION, else "
                        f"{DEFAULT_VERSION})")
    g.add_argument("--unet-config", type=Path, default=None,
                   help="upstream U-Net config overriding the version's (default: $LATENTSYNC_UNET_CONFIG, else the "
                        "weights folder's unet.yaml, else the version's shipped one)")
    g.add_argument("--syncnet-config", type=Path, default=None,
                   help="StableSyncNet config (default: $LATENTSYNC_SYNCNET_CONFIG, else the weights folder's "
                        "syncnet.yaml, else the shipped one)")
    g.add_argument("--device", default=None, metavar="{cpu,cuda,cuda:N,mps}",
                   help="where the models run (default: CUDA when present, else the CPU)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="precision of the models (default: fp16 on CUDA sm_80+, else fp32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net and VAE: slower start, faster long runs (default: off, unless "
                        "$LATENTSYNC_COMPILE=1)")


def _pick(given: Any, flag: str, environ: Mapping[str, str], variable: str) -> tuple[str, str] | None:
    """(value, where it came from): the flag when given, else the variable when set, else None."""
    if given is not None:
        return str(given), flag
    value = environ.get(variable, "").strip()
    return (value, variable) if value else None


def _config(given: Any, flag: str, environ: Mapping[str, str], variable: str, own: Path | None) -> Path | None:
    """A config named by the flag, else the variable, else the weights folder's ``own``; it must be an upstream YAML
    file with a ``model:`` section."""
    chosen = _pick(given, flag, environ, variable) or (own and (str(own), "the weights folder's config"))
    if not chosen:
        return None
    load_config(chosen[0], chosen[1], section="model")  # a malformed config costs milliseconds, not a model load
    return Path(chosen[0]).resolve()
