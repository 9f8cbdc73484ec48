"""The front doors' shared parts: settings from flags and environment, the model flags, the error formatter."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import tempfile

import pytest

from latentsync import InputError
from latentsync.config import folder_configs
from latentsync.download import ensure_weights
from latentsync.errors import OUT_OF_MEMORY, Interrupted, ResourceError, describe
from latentsync.settings import Settings, add_model_arguments


def test_flags_win_over_the_environment_and_paths_are_checked(tmp_path):
    unet, syncnet = tmp_path / "unet.yaml", tmp_path / "syncnet.yaml"
    for config in (unet, syncnet):
        config.write_text("model: {}\n")
    environ = {"LATENTSYNC_WEIGHTS_DIR": str(tmp_path / "w"), "LATENTSYNC_VERSION": "1.5",
               "LATENTSYNC_UNET_CONFIG": str(unet), "HF_ENDPOINT": "http://mirror", "XDG_CACHE_HOME": "",
               "LATENTSYNC_COMPILE": "1", "LATENTSYNC_MAX_SIDE": "640"}
    s = Settings.read(environ)
    assert (s.weights_dir, s.version, s.unet_config, s.syncnet_config) == (tmp_path / "w", "1.5", unet, None)
    assert s.endpoint == "http://mirror" and s.cache_home is None and s.compile and s.caps.max_side == 640
    s = Settings.read(environ, weights_dir=tmp_path / "v", version="1.6", syncnet_config=syncnet)
    assert (s.weights_dir, s.version, s.syncnet_config) == (tmp_path / "v", "1.6", syncnet)
    assert Settings.read({}).version == "1.6" and Settings.read({}).weights_dir is None


@pytest.mark.parametrize("environ, flags, words", [
    ({"LATENTSYNC_VERSION": "1.7"}, {}, "LATENTSYNC_VERSION must be one of 1.5, 1.6, not '1.7'"),
    ({}, {"version": "2"}, "--version must be one of"),
    ({"LATENTSYNC_SYNCNET_CONFIG": "/nonexistent.yaml"}, {}, "LATENTSYNC_SYNCNET_CONFIG /nonexistent.yaml does not"),
    ({"LATENTSYNC_COMPILE": "yes"}, {}, "LATENTSYNC_COMPILE must be 1 or 0"),
    ({"LATENTSYNC_MAX_SIDE": "-1"}, {}, "LATENTSYNC_MAX_SIDE"),
])
def test_a_bad_setting_names_where_it_came_from(environ, flags, words):
    with pytest.raises(InputError, match=words):
        Settings.read(environ, **flags)


def test_model_arguments_read_back_as_settings():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--version", "1.5", "--device", "cpu", "--dtype", "fp32", "--compile"])
    s = Settings.from_args(args, {"LATENTSYNC_VERSION": "1.6"})
    assert (s.version, s.device, s.dtype, s.compile) == ("1.5", "cpu", "fp32", True)


def test_describe_gives_each_door_the_same_status_and_line():
    assert describe(InputError("bad\n  input")) == (2, "bad input")
    assert describe(ResourceError("no disk")) == (1, "no disk")
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/o.mp4")) == (1, "No space left on device: "
                                                                                        "/o.mp4")
    assert describe(MemoryError()) == (1, OUT_OF_MEMORY.format(where=""))
    assert describe(RuntimeError("CUDA out of memory. Tried"))[1].startswith("out of GPU memory")
    assert describe(Interrupted(signal.SIGTERM)) == (143, "interrupted by SIGTERM")
    assert describe(KeyboardInterrupt()) == (130, "interrupted by SIGINT")
    assert describe(ValueError("whatever"), signal.SIGTERM)[0] == 143, "after a signal, anything is its doing"
    assert describe(ValueError("a bug")) is None and describe(OSError("no strerror")) is None


@pytest.mark.parametrize("text, words", [
    ("model: [unclosed\n", "is not a readable YAML file"),
    ("# only a comment\n", "has no model: section"),
    ("- a list\n", "holds a list, not a YAML mapping"),
    ("data: {resolution: 256}\n", "has no model: section"),
    ("model: 3\n", "has no model: section"),
])
def test_a_malformed_config_is_one_input_error_naming_its_flag(tmp_path, text, words):
    config = tmp_path / "unet.yaml"
    config.write_text(text)
    for flags, environ, name in (({"unet_config": config}, {}, "--unet-config"),
                                 ({}, {"LATENTSYNC_SYNCNET_CONFIG": str(config)}, "LATENTSYNC_SYNCNET_CONFIG")):
        with pytest.raises(InputError) as caught:
            Settings.read(environ, **flags)
        assert str(caught.value).startswith(f"{name} {config}") and words in str(caught.value)
        assert "\n" not in str(caught.value)


def test_compiled_kernels_of_a_named_weights_folder_go_to_the_cache_folder(tmp_path, monkeypatch):
    import torch

    import latentsync.models.compiled as compiled_mod
    from tiny_weights import make_tiny_weights

    monkeypatch.setattr(compiled_mod, "BACKEND", "eager")  # the plumbing, not inductor's minutes
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder, cfg = make_tiny_weights(tmp_path / "w", syncnet=False)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    settings = Settings.read({"XDG_CACHE_HOME": str(tmp_path / "cache")}, weights_dir=folder, unet_config=cfg,
                             device="cpu", compile=True)
    settings.load(folder)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # the user's folder: untouched
    tag = f"cpu-torch{torch.__version__}".replace("+", "_")
    assert (tmp_path / "cache" / "latentsync" / "compile-cache" / tag).is_dir()


def _self_describing_folder(folder):
    """A weights folder with its own manifest and model configs (the files themselves do not matter here)."""
    folder.mkdir()
    (folder / "weights.txt").write_text("1.6 - latentsync_unet.pt - -\n")
    for name in ("unet.yaml", "syncnet.yaml"):
        (folder / name).write_text("model: {}\n")
    return folder


@pytest.mark.parametrize("named_by", ["flag", "variable"])
def test_a_weights_folder_that_describes_itself_needs_no_other_setting(tmp_path, named_by):
    folder = _self_describing_folder(tmp_path / "mine")
    s = Settings.read({}, weights_dir=folder) if named_by == "flag" \
        else Settings.read({"LATENTSYNC_WEIGHTS_DIR": str(folder)})
    assert (s.manifest, s.unet_config, s.syncnet_config) == (folder / "weights.txt", folder / "unet.yaml",
                                                            folder / "syncnet.yaml")


def test_named_files_win_over_the_folders_own(tmp_path):
    folder = _self_describing_folder(tmp_path / "mine")
    other = _self_describing_folder(tmp_path / "other")
    s = Settings.read({"LATENTSYNC_MANIFEST": str(other / "weights.txt"),
                       "LATENTSYNC_UNET_CONFIG": str(other / "unet.yaml")},
                      weights_dir=folder, syncnet_config=other / "syncnet.yaml")
    assert (s.manifest, s.unet_config, s.syncnet_config) == (other / "weights.txt", other / "unet.yaml",
                                                            other / "syncnet.yaml")


def test_the_official_layout_and_the_default_folder_use_the_shipped_files(tmp_path):
    official = tmp_path / "official"
    official.mkdir()
    for s in (Settings.read({}, weights_dir=official), Settings.read({})):
        assert (s.manifest, s.unet_config, s.syncnet_config) == (None, None, None)


def test_a_malformed_config_of_the_folder_is_named_as_the_folders(tmp_path):
    folder = _self_describing_folder(tmp_path / "mine")
    (folder / "unet.yaml").write_text("- a list\n")
    with pytest.raises(InputError, match=f"the weights folder's config {folder / 'unet.yaml'} holds a list"):
        Settings.read({}, weights_dir=folder)


def test_a_named_folder_is_verified_against_its_own_manifest(tmp_path):
    from tiny_weights import make_tiny_weights

    folder, _ = make_tiny_weights(tmp_path / "tiny", syncnet=False)
    assert ensure_weights(None, folder, "1.6") == folder  # the shipped manifest would refuse every file
    (folder / "mask.png").write_bytes(b"not the mask it lists")
    with pytest.raises(InputError, match="mask.png: 21 bytes, expected"):
        ensure_weights(None, folder, "1.6")


def test_the_api_finds_the_folders_own_configs(tmp_path):
    folder = _self_describing_folder(tmp_path / "mine")
    assert folder_configs(folder) == (folder / "unet.yaml", folder / "syncnet.yaml")
    assert folder_configs(folder, "mine.yaml") == ("mine.yaml", folder / "syncnet.yaml")
    assert folder_configs(tmp_path) == (None, None)


@pytest.mark.parametrize("given, expected", [(None, None), ("cpu", "cpu"), (" CUDA ", "cuda"), ("cuda:1", "cuda:1"),
                                             ("mps", "mps")])
def test_a_device_name_is_checked_without_torch(given, expected):
    assert Settings.read({}, device=given).device == expected


@pytest.mark.parametrize("given", ["tpu", "cuda:x", "gpu", "cuda:-1", ""])
def test_an_unknown_device_is_one_input_error(given):
    with pytest.raises(InputError, match=f"unknown device {given!r}; use cpu, cuda, cuda:N or mps"):
        Settings.read({}, device=given)


@pytest.mark.parametrize("kernels", [False, True])
def test_inductors_folder_in_the_temporary_folder_is_removed_only_while_empty(tmp_path, monkeypatch, kernels):
    from latentsync.models.compiled import remove_unused_inductor_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / "torchinductor_someone"  # what importing torch._dynamo makes
    folder.mkdir()
    if kernels:
        (folder / "kernel.py").write_text("# compiled\n")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    remove_unused_inductor_folder()
    assert folder.exists() == kernels
    assert ("TORCHINDUCTOR_CACHE_DIR" in os.environ) == kernels


def test_an_inductor_folder_named_elsewhere_is_left_alone(tmp_path, monkeypatch):
    from latentsync.models.compiled import remove_unused_inductor_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    chosen = tmp_path / "torchinductor_mine"  # the user's, or a compiled load's cache folder
    chosen.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(chosen))
    remove_unused_inductor_folder()
    assert chosen.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
