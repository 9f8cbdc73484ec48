"""RunOptions: every option validated once, with the same message whatever the front door."""
from __future__ import annotations

import math

import pytest

from latentsync import InputError
from latentsync.options import GUIDANCE_SCALE, INFERENCE_STEPS, RunOptions, check_file, check_version


def test_defaults_are_upstreams():
    opts = RunOptions()
    assert (opts.guidance_scale, opts.steps, opts.loop_mode, opts.deepcache) == (1.5, 20, "bounce", True)
    assert (opts.sampler, opts.guidance_until, opts.guided_steps) == ("ddim", 1.0, 20)  # guidance at every step
    assert (GUIDANCE_SCALE, INFERENCE_STEPS) == (1.5, 20)


def test_each_sampler_has_its_own_step_count_unless_one_is_given():
    assert [RunOptions(sampler=s).steps for s in ("ddim", "dpmpp_2m", "unipc")] == [20, 10, 10]
    assert RunOptions(sampler="unipc", inference_steps=7).steps == 7
    # an option left to the sampler follows a later change of sampler
    assert RunOptions.make(RunOptions(), sampler="dpmpp_2m").steps == 10


@pytest.mark.parametrize("until, steps, guided", [(1.0, 20, 20), (0.5, 10, 5), (0.5, 5, 3), (0.3, 10, 3),
                                                   (0.01, 10, 1), (0.0, 10, 0)])
def test_guidance_until_guides_the_first_ceil_fraction_of_the_steps(until, steps, guided):
    assert RunOptions(guidance_until=until, inference_steps=steps).guided_steps == guided
    assert RunOptions(guidance_scale=1.0, guidance_until=until, inference_steps=steps).guided_steps == 0


@pytest.mark.parametrize("field, value, words", [
    ("guidance_scale", math.inf, "finite"),
    ("guidance_scale", math.nan, "finite"),
    ("guidance_scale", 0.5, "between 1 and 3"),
    ("guidance_scale", 3.5, "between 1 and 3"),
    ("guidance_scale", "lots", "a number"),
    ("inference_steps", 0, "between 1 and 100"),
    ("inference_steps", 2.5, "whole number"),
    ("sampler", "euler", "ddim, dpmpp_2m, unipc"),
    ("guidance_until", 1.5, "between 0 and 1"),
    ("guidance_until", -0.1, "between 0 and 1"),
    ("guidance_until", "half", "a number"),
    ("seed", -1, "between 0 and 4294967295"),
    ("seed", 2**32, "between 0 and 4294967295"),
    ("loop_mode", "zigzag", "bounce, loop, cut_off, silence"),
    ("face_select", "leftmost", "largest, active_speaker"),
    ("face_point", (math.nan, math.nan), "finite"),
    ("face_point", (1.0,), "two numbers"),
    ("face_point", "10,20", "two numbers"),
    ("deepcache", "yes", "true or false"),
])
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises(InputError, match=field) as info:
        RunOptions.make(**{field: value})
    assert words in str(info.value)


def test_make_merges_overrides_and_refuses_unknown_names():
    base = RunOptions(seed=7)
    assert RunOptions.make(base, guidance_scale=2).guidance_scale == 2.0
    assert RunOptions.make({"seed": 3}).seed == 3
    with pytest.raises(InputError, match="'guidance'"):
        RunOptions.make(guidance=2)


def test_with_seed_keeps_a_given_seed_and_draws_one_otherwise():
    assert RunOptions(seed=0).with_seed().seed == 0
    drawn = RunOptions().with_seed().seed
    assert isinstance(drawn, int) and 0 <= drawn <= 2**32 - 1


def test_versions_and_files(tmp_path):
    assert check_version(" 1.5 ") == "1.5"
    with pytest.raises(InputError, match="1.5, 1.6"):
        check_version("2.0")
    with pytest.raises(InputError, match="does not exist"):
        check_file("--unet-config", tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="is a folder"):
        check_file("--unet-config", tmp_path)


@pytest.mark.parametrize("name, words", [
    ("tpu", "unknown device 'tpu'"),
    ("cuda:x", "unknown device 'cuda:x'"),
    ("xla", "is not supported"),
    ("mps", "MPS is not available"),
])
def test_devices_the_machine_cannot_give_are_input_errors(name, words):
    from latentsync.devices import pick_device

    with pytest.raises(InputError) as info:
        pick_device(name)
    assert words in str(info.value) and len(str(info.value).splitlines()) == 1


def test_cuda_without_a_gpu_is_an_input_error():
    import torch

    from latentsync.devices import pick_device

    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
        with pytest.raises(InputError, match="CUDA GPU"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(InputError, match="'cuda:1'.*device 'cpu'"):
            pick_device("cuda:1")
    assert pick_device(" CPU ").type == "cpu"


def test_dtype_names_come_from_the_options():
    import torch

    from latentsync.devices import pick_dtype
    from latentsync.options import DTYPES

    cpu = torch.device("cpu")
    assert [pick_dtype(cpu, name) for name in DTYPES] == [torch.float32, torch.float16, torch.bfloat16]
    assert pick_dtype(cpu) == torch.float32
    with pytest.raises(InputError, match="fp32, fp16, bf16"):
        pick_dtype(cpu, "int8")
    with pytest.raises(InputError, match="not supported"):
        pick_dtype(cpu, torch.int8)


@pytest.mark.parametrize("options", [42, "seed=3", [("seed", 3)]])
def test_make_refuses_options_that_are_neither_run_options_nor_a_dict(options):
    with pytest.raises(InputError, match="options must be a RunOptions or a dict"):
        RunOptions.make(options)


def test_the_package_names_lipsync_without_loading_torch():
    import subprocess
    import sys

    code = ("import sys, latentsync; assert 'torch' not in sys.modules; "
            "from latentsync import LipSync, RunOptions; from latentsync.pipeline import LipSync as L; "
            "assert LipSync is L and RunOptions.__module__ == 'latentsync.options'")
    subprocess.run([sys.executable, "-c", code], check=True)
