"""The ``config`` section of helm/kawhi/values.schema.json, generated from `kawhi serve`'s settings.

    python3 scripts/helm_schema.py        # rewrites properties.config of helm/kawhi/values.schema.json

tests/deploy/test_deploy.py checks that the committed file matches (names, types, enums, bounds).
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "service", ROOT / "client"):  # a checkout without `pip install -e .`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

SCHEMA = ROOT / "helm" / "kawhi" / "values.schema.json"
# Settings the chart sets from its own sections; values.yaml `config` may not name them.
RESERVED_SETTINGS = ("model", "device", "dtype", "host", "port", "grpc_port", "api_keys", "redis_url")


def settings_fields() -> dict[str, Any]:
    from kawhi.settings import Settings

    return dict(Settings.model_fields)


def setting_schema(name: str, field: Any) -> dict[str, Any]:
    """JSON schema of one `kawhi serve` setting, for values.schema.json's `config`."""
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:  # X | None
        ann = args[0]
    out: dict[str, Any] = {}
    if typing.get_origin(ann) is typing.Literal:
        out["enum"] = list(typing.get_args(ann))
    elif ann is bool:
        out["type"] = "boolean"
    elif ann is int:
        out["type"] = "integer"
    elif ann is float:
        out["type"] = "number"
    else:
        out["type"] = "string"
    for m in field.metadata:
        for attr, key in (("gt", "exclusiveMinimum"), ("ge", "minimum"), ("lt", "exclusiveMaximum"), ("le", "maximum")):
            if getattr(m, attr, None) is not None:
                out[key] = getattr(m, attr)
    default = field.default
    desc = (field.description or "").strip()
    out["description"] = f"KAWHI_{name.upper()}: {desc} (default {default!r})"
    return out


def config_schema() -> dict[str, Any]:
    props = {
        name: setting_schema(name, field)
        for name, field in sorted(settings_fields().items())
        if name not in RESERVED_SETTINGS
    }
    return {
        "type": "object",
        "description": (
            "KAWHI_* settings of `kawhi serve` by lower-case name without the prefix "
            "(batch_tokens -> KAWHI_BATCH_TOKENS). Generated from kawhi.settings by "
            "`python3 scripts/helm_schema.py`. model, device, dtype, host, port, "
            "grpc_port, api_keys and redis_url are set by the chart (model.*, grpc.*, auth.*, redis.*)."
        ),
        "additionalProperties": False,
        "properties": props,
    }


def update_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["config"] = config_schema()
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"rewrote properties.config of {SCHEMA.relative_to(ROOT)} ({len(schema['properties']['config']['properties'])} settings)")


if __name__ == "__main__":
    update_schema()
