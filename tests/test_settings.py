"""The front doors' shared parts: settings from flags and environment, the model flags, the error formatter."""
from __future__ import annotations

import argparse
import errno
import signal

import pytest

from latentsync import InputError
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
