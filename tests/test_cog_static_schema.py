"""predict.py's inputs as ``cog build`` reads them: by parsing the file, not importing it (Cog >= 0.20).

Cog's static parser (``pkg/schema/python/inputs.go``, ``module_scope.go``) takes ``description=`` as the literal's source
text with its outer quotes stripped, resolves ``choices=`` only from a list literal or a module-level name of
predict.py bound to one, keeps ``ge``/``le`` only when they are number literals and wants a literal ``default``.
These tests apply exactly those rules with Python's ``ast``, check the values equal ``latentsync.options``, and that
the parser's reading equals what Cog's runtime inspector sees (the ``Input`` objects).
"""
from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
from typing import Any

import pytest

from conftest import REPO
from latentsync import options

ALLOWED_KEYWORDS = {"description", "default", "ge", "le", "choices", "min_length", "max_length", "regex", "deprecated"}


class StaticSchemaError(AssertionError):
    """A construct Cog's static parser would reject, garble or silently drop."""


def _literal_text(source: str, node: ast.expr, where: str) -> str:
    """The value of a single, plain, one-line string literal (what Cog's quote stripping reproduces exactly)."""
    text = ast.get_source_segment(source, node) or ""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT)]
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        raise StaticSchemaError(f"{where}: description must be a string literal, not {text!r}")
    if len(tokens) != 1:
        raise StaticSchemaError(f"{where}: description is {len(tokens)} literals concatenated; Cog keeps their "
                                f"source text, quotes and all")
    if text[0] not in "\"'" or text.startswith(("'''", '"""')):
        raise StaticSchemaError(f"{where}: description must be a plain '...' or \"...\" literal (no prefix, no "
                                f"triple quotes), got {text[:12]!r}")
    if "\\" in text:
        raise StaticSchemaError(f"{where}: description has a backslash escape, which Cog would show verbatim")
    assert text[1:-1] == node.value  # what Cog shows is what Python reads
    return node.value


def _number(node: ast.expr, where: str) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    raise StaticSchemaError(f"{where} must be a number literal (Cog silently drops anything else)")


def _literal(node: ast.expr, where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) for e in node.elts):
        return [e.value for e in node.elts]
    raise StaticSchemaError(f"{where} must be a literal")


def _string_list(node: ast.expr, where: str) -> list[str]:
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and isinstance(e.value, str)
                                          for e in node.elts):
        return [e.value for e in node.elts]
    raise StaticSchemaError(f"{where} must be a list literal of strings")


def static_inputs(source: str) -> dict[str, dict[str, Any]]:
    """The inputs of ``Predictor.predict`` in ``source`` read by Cog's static rules; a violation raises."""
    tree = ast.parse(source)
    module_lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            module_lists[node.targets[0].id] = node.value
    predictor = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    method = next(n for n in predictor.body if isinstance(n, ast.FunctionDef) and n.name == "predict")
    args = method.args.args[1:]
    defaults = method.args.defaults
    assert len(args) == len(defaults), "every input needs an Input(...) default"
    inputs = {}
    for arg, call in zip(args, defaults):
        where = f"input {arg.arg}"
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Input"):
            raise StaticSchemaError(f"{where}: default must be Input(...)")
        if call.args:
            raise StaticSchemaError(f"{where}: Input takes keywords only")
        field: dict[str, Any] = {}
        for keyword in call.keywords:
            name, value = keyword.arg, keyword.value
            if name not in ALLOWED_KEYWORDS:
                raise StaticSchemaError(f"{where}: Input keyword {name!r} is not one Cog reads")
            if name == "description":
                field[name] = _literal_text(source, value, where)
            elif name in ("ge", "le"):
                field[name] = _number(value, f"{where}: {name}")
            elif name == "choices":
                if isinstance(value, ast.Name):
                    if value.id not in module_lists:
                        raise StaticSchemaError(f"{where}: choices name {value.id} is not bound at module level in "
                                                f"predict.py (an import cannot be followed)")
                    value = module_lists[value.id]
                field[name] = _string_list(value, f"{where}: choices")
            else:
                field[name] = _literal(value, f"{where}: {name}")
        if "description" not in field:
            raise StaticSchemaError(f"{where}: no description")
        inputs[arg.arg] = field
    return inputs


@pytest.fixture(scope="module")
def inputs() -> dict[str, dict[str, Any]]:
    return static_inputs((REPO / "predict.py").read_text())


def test_predict_py_follows_cogs_static_rules(inputs):
    assert list(inputs) == ["video", "audio", "guidance_scale", "inference_steps", "seed", "loop_mode",
                            "enable_deepcache", "keep_fps", "face_select"]


def test_literals_equal_the_options_module(inputs):
    assert inputs["loop_mode"]["choices"] == list(options.LOOP_MODES)
    assert inputs["face_select"]["choices"] == list(options.FACE_SELECTS)
    assert (inputs["guidance_scale"]["ge"], inputs["guidance_scale"]["le"]) == options.GUIDANCE_RANGE
    assert (inputs["inference_steps"]["ge"], inputs["inference_steps"]["le"]) == options.STEPS_RANGE
    assert (inputs["seed"]["ge"], inputs["seed"]["le"]) == options.SEED_RANGE
    assert inputs["guidance_scale"]["default"] == options.GUIDANCE_SCALE
    assert inputs["inference_steps"]["default"] == options.INFERENCE_STEPS
    assert inputs["seed"]["default"] is None
    assert inputs["loop_mode"]["default"] == options.LOOP_MODE
    assert inputs["face_select"]["default"] == options.FACE_SELECT
    assert inputs["enable_deepcache"]["default"] is options.DEEPCACHE
    assert inputs["keep_fps"]["default"] is options.KEEP_FPS


def test_seed_description_states_empty_is_random_and_zero_is_a_seed(inputs):
    text = inputs["seed"]["description"]
    assert "empty" in text and "random" in text and "0 is an ordinary seed" in text


def test_static_reading_equals_cogs_runtime_inspector(inputs):
    sys.path.insert(0, str(REPO))
    try:
        import predict
    finally:
        sys.path.remove(str(REPO))
    runtime = {n: p.default for n, p in inspect.signature(predict.Predictor.predict).parameters.items() if n != "self"}
    assert list(runtime) == list(inputs)
    for name, field in inputs.items():
        declared = runtime[name]
        for key in ("description", "ge", "le", "choices"):
            assert getattr(declared, key, None) == field.get(key), f"{name}.{key}"
        assert getattr(declared, "default", None) == field.get("default"), f"{name}.default"


@pytest.mark.parametrize("argument, words", [
    ('description="a " "b"', "concatenated"),
    ('description="tab\\there"', "backslash"),
    ('description=r"x"', "plain"),
    ('description=f"x"', "string literal"),
    ('description="""x"""', "plain"),
    ('description=TEXT', "string literal"),
    ('description="x", choices=list(MODES)', "list literal"),
    ('description="x", choices=IMPORTED', "not bound at module level"),
    ('description="x", ge=LOW', "number literal"),
    ('description="x", default=DEFAULT', "literal"),
    ('"x"', "keywords only"),
])
def test_the_checker_refuses_what_cog_cannot_read(argument, words):
    source = ("from somewhere import IMPORTED, MODES, LOW, DEFAULT, TEXT\n"
              "class Predictor:\n"
              f"    def predict(self, a: str = Input({argument})):\n"
              "        pass\n")
    with pytest.raises(StaticSchemaError, match=words):
        static_inputs(source)
