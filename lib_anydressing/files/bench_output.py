"""How every bench command prints its figures: one JSON object (`--json`) or aligned `key: value` lines."""

from __future__ import annotations

import json


def print_result(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
