"""predict.py's inputs as ``cog build`` reads them: Cog's own static parser (``../shared/cog/bin``), not an import.

The parser's schema is checked field by field against ``latentsync.options``, against Cog's runtime ``Input`` objects
and against the README's inputs table; the traps test breaks one rule at a time in a copy of predict.py and shows
what the real parser does with it (stops the build, or drops the value without a word).
"""
from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import cog_parser
from conftest import REPO
from latentsync import options

NAMES = ["video", "audio", "guidance_scale", "inference_steps", "sampler", "guidance_until", "seed", "loop_mode",
         "enable_deepcache", "keep_fps", "face_select", "ranges"]


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict[str, Any]:
    project = tmp_path_factory.mktemp("cog-project")
    shutil.copy(REPO / "predict.py", project / "predict.py")
    return cog_parser.write_schema(project) | {"_file": project / ".cog" / "openapi_schema.json"}


@pytest.fixture(scope="module")
def inputs(schema) -> dict[str, dict[str, Any]]:
    return cog_parser.inputs(schema)


def test_the_schema_passes_cogs_openapi_check(schema):
    assert cog_parser.validate(schema["_file"]) == "valid"


def test_inputs_types_defaults_ranges_choices_and_nullability(schema, inputs):
    assert list(inputs) == NAMES
    assert schema["components"]["schemas"]["Input"]["required"] == ["video", "audio"]
    assert [inputs[n]["x-order"] for n in NAMES] == list(range(len(NAMES)))
    for name in ("video", "audio"):
        assert (inputs[name]["type"], inputs[name]["format"]) == ("string", "uri")
        assert "default" not in inputs[name]
    assert inputs["video"]["x-cog-accept"] == "video/*"
    assert inputs["audio"]["x-cog-accept"] == "audio/*,video/*"  # a video's soundtrack is accepted too
    expected = {
        "guidance_scale": ("number", options.GUIDANCE_SCALE, *options.GUIDANCE_RANGE),
        "inference_steps": ("integer", None, *options.STEPS_RANGE),  # empty: the sampler's own count
        "guidance_until": ("number", options.GUIDANCE_UNTIL, *options.GUIDANCE_UNTIL_RANGE),
        "seed": ("integer", None, *options.SEED_RANGE),
    }
    for name, (kind, default, low, high) in expected.items():
        field = inputs[name]
        assert (field["type"], field["default"], field["minimum"], field["maximum"]) == (kind, default, low, high), name
    assert inputs["seed"]["nullable"] is True
    assert [n for n in NAMES if inputs[n].get("nullable")] == ["inference_steps", "seed"]
    assert options.RunOptions(inference_steps=inputs["inference_steps"]["default"]).steps == options.INFERENCE_STEPS
    assert (inputs["sampler"]["enum"], inputs["sampler"]["default"]) == (list(options.SAMPLERS), options.SAMPLER)
    assert (inputs["loop_mode"]["enum"], inputs["loop_mode"]["default"]) == (list(options.LOOP_MODES),
                                                                             options.LOOP_MODE)
    assert (inputs["face_select"]["enum"], inputs["face_select"]["default"]) == (list(options.FACE_SELECTS),
                                                                                 options.FACE_SELECT)
    assert inputs["loop_mode"]["type"] == inputs["face_select"]["type"] == "string"
    assert (inputs["enable_deepcache"]["type"], inputs["enable_deepcache"]["default"]) == ("boolean", options.DEEPCACHE)
    assert (inputs["keep_fps"]["type"], inputs["keep_fps"]["default"]) == ("boolean", options.KEEP_FPS)
    assert (inputs["ranges"]["type"], inputs["ranges"]["default"]) == ("string", "")
    assert options.parse_ranges(inputs["ranges"]["default"]) == options.RunOptions().ranges  # empty: whole video
    assert all(inputs[n]["description"] for n in NAMES), "a description the parser could not read is dropped"
    output = schema["components"]["schemas"]["Output"]
    assert (output["type"], output["format"]) == ("string", "uri")


def test_seed_description_states_empty_is_random_and_zero_is_a_seed(inputs):
    text = inputs["seed"]["description"]
    assert "empty" in text and "random" in text and "0 is an ordinary seed" in text


def test_parser_reading_equals_cogs_runtime_inspector(inputs):
    """What ``cog build`` writes equals what the SDK sees when it imports predict.py (the unit tests' view)."""
    sys.path.insert(0, str(REPO))
    try:
        import predict
    finally:
        sys.path.remove(str(REPO))
    runtime = {n: p.default for n, p in inspect.signature(predict.Predictor.predict).parameters.items() if n != "self"}
    assert list(runtime) == list(inputs)
    for name, field in inputs.items():
        declared = runtime[name]
        assert declared.description == field["description"], name
        assert (declared.ge, declared.le) == (field.get("minimum"), field.get("maximum")), name
        assert declared.choices == field.get("enum"), name
        assert declared.default == field.get("default"), name
        assert declared.accept == field.get("x-cog-accept"), name


# --- the README's table ---------------------------------------------------------------------------------------------

def _readme_table() -> list[list[str]]:
    """Rows of the inputs table in the README's "Cog container (Replicate)" section, cells stripped of backticks."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Cog container (Replicate)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def _cell_type(field: dict[str, Any]) -> str:
    if field.get("format") == "uri":
        return "file"
    kind = "choice" if "enum" in field else field["type"]
    return f"{kind} or empty" if field.get("nullable") else kind


def _cell_default(name: str, field: dict[str, Any], required: list[str]) -> str:
    if name in required:
        return "required"
    value = field["default"]
    if value is None or value == "":
        return "empty"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cell_allowed(field: dict[str, Any]) -> str:
    if "enum" in field:
        return ", ".join(field["enum"])
    if "minimum" in field:
        low, high = (int(v) if float(v).is_integer() else v for v in (field["minimum"], field["maximum"]))
        return f"{low} to {high}"
    return field.get("x-cog-accept", "—")


def test_readme_inputs_table_equals_the_schema(schema, inputs):
    required = schema["components"]["schemas"]["Input"]["required"]
    rows = _readme_table()
    assert [row[0] for row in rows] == list(inputs)
    for name, kind, default, allowed, meaning in rows:
        field = inputs[name]
        assert (kind, default, allowed) == (_cell_type(field), _cell_default(name, field, required),
                                            _cell_allowed(field)), name
        assert meaning, name


# --- the traps: each rule the parser enforces, broken once ----------------------------------------------------------

def _broken_copy(tmp_path: Path, old: str, new: str, header: str = "") -> Path:
    project = tmp_path / "project"
    project.mkdir()
    source = (REPO / "predict.py").read_text()
    assert source.count(old) == 1, old
    source = source.replace(old, new)
    if header:
        source = source.replace("\nclass Predictor(", f"\n{header}\n\n\nclass Predictor(", 1)
    (project / "predict.py").write_text(source)
    return project


@pytest.mark.parametrize("old, new, header, refusal", [
    ("choices=LOOP_MODES", "choices=IMPORTED_MODES", "from latentsync.options import LOOP_MODES as IMPORTED_MODES",
     r"loop_mode.*choices expression cannot be statically resolved"),
    ("choices=LOOP_MODES", 'choices=("bounce", "loop")', "",
     r"loop_mode.*choices expression cannot be statically resolved"),
    ("video: Path = Input(", "video: FsPath = Input(", "", r"FsPath.*cannot be statically analyzed"),
], ids=["imported-choices", "tuple-choices", "pathlib-annotation"])
def test_the_parser_refuses(tmp_path, old, new, header, refusal):
    """These stop ``cog build``: choices must be a list literal or a module-level name bound to one; an input's type
    must be Cog's ``Path``, not pathlib's."""
    with pytest.raises(cog_parser.Refused, match=refusal):
        cog_parser.parse(_broken_copy(tmp_path, old, new, header))


@pytest.mark.parametrize("old, new, header, name, dropped", [
    ("ge=1.0, le=3.0, default=1.5", "ge=1.0, le=3.0, default=GUIDANCE_SCALE",
     "from latentsync.options import GUIDANCE_SCALE", "guidance_scale", "default"),
    ("le=4294967295", "le=2**32-1", "", "seed", "maximum"),
    ("le=4294967295", "le=0xFFFFFFFF", "", "seed", "maximum"),
    ('description="Random seed:', 'description=f"Random seed:', "", "seed", "description"),
], ids=["imported-default", "power-bound", "hex-bound", "f-string-description"])
def test_the_parser_drops_without_a_word(tmp_path, old, new, header, name, dropped):
    """These build, but the value is gone from the schema: Replicate would show no default, no bound, no text."""
    field = cog_parser.inputs(cog_parser.parse(_broken_copy(tmp_path, old, new, header)))[name]
    assert dropped not in field
    assert dropped in cog_parser.inputs(cog_parser.parse(REPO))[name]  # the real predict.py keeps it


def test_an_unresolvable_default_makes_the_input_required(tmp_path):
    project = _broken_copy(tmp_path, "ge=1.0, le=3.0, default=1.5", "ge=1.0, le=3.0, default=GUIDANCE_SCALE",
                           "from latentsync.options import GUIDANCE_SCALE")
    assert "guidance_scale" in cog_parser.parse(project)["components"]["schemas"]["Input"]["required"]

