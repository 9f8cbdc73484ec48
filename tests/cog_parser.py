"""Cog's real schema step, as ``cog build`` runs it: the static parser and the OpenAPI check from ``../shared/cog/bin``.

Both binaries are built from Cog's own source; tests that use them are skipped where ``../shared`` is absent.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import shared_file

PREDICTOR = "predict.py:Predictor"


class Refused(Exception):
    """The parser stopped, as ``cog build`` would; the message is its ``ERROR: …`` line."""


def parse(project: Path, predictor: str = PREDICTOR) -> dict[str, Any]:
    """The OpenAPI schema ``cog build`` would write for ``project``; raises :class:`Refused` where it would stop."""
    binary = shared_file("cog", "bin", "staticschema")
    proc = subprocess.run([str(binary), str(project), predictor], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        raise Refused(" ".join(errors) or proc.stderr.strip())
    return json.loads(proc.stdout)


def validate(schema_file: Path) -> str:
    """``valid``, or the ``INVALID: …`` line of Cog's OpenAPI check (kin-openapi) on ``schema_file``."""
    binary = shared_file("cog", "bin", "oasvalidate")
    proc = subprocess.run([str(binary), str(schema_file)], capture_output=True, text=True, timeout=120)
    return (proc.stdout + proc.stderr).strip()


def write_schema(project: Path) -> dict[str, Any]:
    """Parse ``project`` and write the result where ``cog build`` puts it (``.cog/openapi_schema.json``)."""
    schema = parse(project)
    (project / ".cog").mkdir(exist_ok=True)
    (project / ".cog" / "openapi_schema.json").write_text(json.dumps(schema, indent=2))
    return schema


def inputs(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Input properties with each ``allOf: [$ref]`` replaced by the referenced enum (``enum``, ``type``)."""
    components = schema["components"]["schemas"]
    resolved = {}
    for name, prop in components["Input"]["properties"].items():
        prop = dict(prop)
        for ref in prop.pop("allOf", []):
            target = components[ref["$ref"].rsplit("/", 1)[1]]
            prop.update(enum=target["enum"], type=target["type"])
        resolved[name] = prop
    return resolved
