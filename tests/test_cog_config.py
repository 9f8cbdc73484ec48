"""cog.yaml and requirements-cog.txt: valid for Cog, consistent with its torch table and with requirements.txt."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO, shared_file

# Cog's deny-list for `environment:` (pkg/config/env.go): names Cog or Replicate set themselves.
DENIED_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "R8_*", "REPLICATE_*",
              "LIBRARY_PATH", "CUDA_*", "NVIDIA_*", "NV_*", "PGET_*", "HF_ENDPOINT", "HF_HUB_ENABLE_HF_TRANSFER",
              "KUBERNETES_*")


@pytest.fixture(scope="module")
def cog_config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def _pins(path: Path) -> list[str]:
    """Requirement lines without comments or blank lines, options (``--…``) excluded."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(re.sub(r"\s+", "", line))
    return lines


def _options(path: Path) -> list[str]:
    return [raw.split("#", 1)[0].strip() for raw in path.read_text().splitlines() if raw.strip().startswith("-")]


def test_cog_yaml_validates_against_cogs_schema(cog_config):
    schema = json.loads(shared_file("cog", "config_schema_v1.0.json").read_text())
    jsonschema.Draft7Validator(schema).validate(cog_config)


def test_cog_yaml_essentials(cog_config):
    build = cog_config["build"]
    assert build["gpu"] is True
    assert str(build["python_version"]) == "3.11"
    assert (REPO / build["python_requirements"]).is_file()
    assert "python_packages" not in build, "python_packages and python_requirements are exclusive"
    assert {"libgl1", "libglib2.0-0"} <= set(build["system_packages"])


def test_no_system_ffmpeg_and_the_pinned_one_is_a_requirement(cog_config):
    assert not any("ffmpeg" in p for p in cog_config["build"]["system_packages"]), "one pinned ffmpeg: imageio-ffmpeg"
    cog_reqs = _pins(REPO / cog_config["build"]["python_requirements"])
    assert any(re.fullmatch(r"imageio-ffmpeg==[\d.]+", p) for p in cog_reqs)


def test_predict_reference_points_at_a_predictor_class(cog_config):
    assert "run" not in cog_config, "predict: and run: are exclusive"
    file_name, class_name = cog_config["predict"].split(":")
    tree = ast.parse((REPO / file_name).read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert class_name in classes
    methods = {n.name for n in classes[class_name].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "predict"} <= methods


def test_pget_is_installed_at_build_time(cog_config):
    commands = [c if isinstance(c, str) else c["command"] for c in cog_config["build"]["run"]]
    pget = [c for c in commands if "pget" in c]
    assert len(pget) == 1
    assert re.search(r"curl .*https://github\.com/replicate/pget/releases/download/v[\d.]+/pget_linux_x86_64", pget[0])
    flags = "".join(re.findall(r"\s-(\w+)", pget[0].split("https://")[0]))
    assert "L" in flags and "f" in flags, "GitHub release links redirect; a failed download must fail the build"
    assert "chmod +x /usr/local/bin/pget" in pget[0]


def test_environment_sets_no_name_cog_denies(cog_config):
    names = []
    for entry in cog_config.get("environment") or []:
        name, sep, _ = entry.partition("=")
        assert sep, f"{entry!r} is not NAME=value"
        names.append(name)
        for pattern in DENIED_ENV:
            denied = name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern
            assert not denied, f"Cog refuses environment variable {name} ({pattern})"
    assert len(names) == len(set(names))


def test_torch_pin_is_a_cuda_build_cog_knows_for_python_311(cog_config):
    table = json.loads(shared_file("cog", "torch_compatibility.json").read_text())
    cog_reqs = REPO / cog_config["build"]["python_requirements"]
    torch_pins = [p for p in _pins(cog_reqs) if re.match(r"torch(==|$)", p)]
    assert len(torch_pins) == 1, torch_pins
    version = torch_pins[0].split("==", 1)[1]
    rows = [r for r in table if r["Torch"] == version and r["CUDA"]]
    assert rows, f"torch {version} is not a CUDA build in Cog's table"
    row = rows[0]
    assert str(cog_config["build"]["python_version"]) in row["Pythons"]
    assert cog_config["build"].get("cuda", row["CUDA"]) == row["CUDA"]
    assert f"--extra-index-url {row['ExtraIndexURL'].rstrip('/')}" in [o.rstrip("/") for o in _options(cog_reqs)]
    assert not any(p.startswith("torchvision") for p in _pins(cog_reqs))


def test_cog_requirements_repeat_every_runtime_pin():
    runtime = _pins(REPO / "requirements.txt")
    cog = _pins(REPO / "requirements-cog.txt")
    assert runtime, "requirements.txt has no pins"
    missing = [p for p in runtime if p not in cog]
    assert not missing, f"requirements-cog.txt lacks (or pins differently) {missing}"
    assert not any(o.startswith(("-r", "--requirement")) for o in _options(REPO / "requirements-cog.txt"))
    extra = [p for p in cog if p not in runtime and not p.startswith(("torch==", "coglet=="))]
    assert not extra, f"requirements-cog.txt pins packages requirements.txt does not: {extra}"


def test_coglet_is_pinned_to_the_sdk_version_the_tests_run(cog_config):
    """sdk_version pins the cog SDK only (it asks for coglet<1.0); the pin in requirements-cog.txt fixes coglet."""
    coglet = [p.split("==", 1)[1] for p in _pins(REPO / "requirements-cog.txt") if p.startswith("coglet==")]
    assert coglet == [cog_config["build"]["sdk_version"]]
    assert coglet[0] == importlib.metadata.version("coglet") == importlib.metadata.version("cog")


# --- cog-safe-push.yaml ---------------------------------------------------------------------------------------------

SAFE_PUSH_KEYS = {"model", "test_model", "test_hardware", "predict", "train", "deployment", "dockerfile", "parallel",
                  "fast_push", "use_cog_base_image", "ignore_schema_compatibility", "official_model"}
CASE_KEYS = {"inputs", "exact_string", "match_url", "match_prompt", "error_contains"}


def _fits(field: dict, value) -> bool:
    """Whether ``value`` is one the schema's field accepts (type, range, choices)."""
    kind = field.get("type")
    if "enum" in field:
        return value in field["enum"]
    if field.get("format") == "uri":
        return isinstance(value, str) and value.startswith("https://")
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("integer", "number"):
        numeric = isinstance(value, int) if kind == "integer" else isinstance(value, (int, float))
        return numeric and not isinstance(value, bool) and field["minimum"] <= value <= field["maximum"]
    return isinstance(value, str)


def test_cog_safe_push_cases_fit_the_schema_and_name_real_samples(tmp_path):
    import cog_parser
    from latentsync import media

    config = yaml.safe_load((REPO / "cog-safe-push.yaml").read_text())
    assert set(config) <= SAFE_PUSH_KEYS and set(config["predict"]) <= {"compare_outputs", "predict_timeout",
                                                                         "test_cases", "fuzz"}
    shutil.copy(REPO / "predict.py", tmp_path / "predict.py")
    schema = cog_parser.parse(tmp_path)
    fields, required = cog_parser.inputs(schema), schema["components"]["schemas"]["Input"]["required"]
    cases = config["predict"]["test_cases"]
    for case in cases:
        assert set(case) <= CASE_KEYS and sum(k != "inputs" for k in case) <= 1, case
        assert set(required) <= set(case["inputs"]), case
        for name, value in case["inputs"].items():
            assert _fits(fields[name], value), (name, value)
            if fields[name].get("format") == "uri" and "/samples/" in value:
                assert (REPO / "samples" / value.rsplit("/samples/", 1)[1]).is_file(), value
    failing = [c for c in cases if "error_contains" in c]
    assert len(failing) == 1 and len(cases) - len(failing) >= 2
    assert failing[0]["error_contains"] in media.refused_format("video", Path("x.png"))
    mask = next(line.split()[1] for line in (REPO / "weights.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#") and line.split()[2] == "mask.png")
    assert failing[0]["inputs"]["video"] == mask  # a pinned URL of an image: an input that must fail
    assert any(c["inputs"].get("seed") == 0 for c in cases)
