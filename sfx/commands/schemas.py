"""``sfx schemas``: write the JSON Schema of every message type, for external tools to validate against."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from libs.contracts.messages import MESSAGE_TYPES


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("schemas", help="write the JSON Schemas of the message contracts")
    parser.add_argument("--out", type=Path, default=Path("docs/schemas"), help="output directory")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    for type_name, model in sorted(MESSAGE_TYPES.items()):
        schema = model.model_json_schema(mode="serialization")
        schema["$id"] = f"sfx-live/{type_name}/v{model.model_fields['schema_version'].default}"
        path = out / f"{type_name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(path)
    return 0
