"""The output folder: one PNG per image and `results.jsonl`, a line per outcome, appended as it happens.

An image is written to a `.part` file and renamed, so an interrupted run never leaves a half-written PNG
under its real name; its results line follows the rename. A re-run reads the lines back and skips every
image recorded as done whose file is there (the latest line about an image wins: a failed one is retried).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .jobs import BadJob
from .runner import Rendered

RESULTS = "results.jsonl"


class OutputFolder:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png.part"):  # left by a run killed between writing and renaming
            stale.unlink()
        self.results = folder / RESULTS

    def finished(self) -> set[str]:
        """Keys (id-seed) of the images done by earlier runs."""
        latest: dict[str, dict[str, Any]] = {}
        if self.results.is_file():
            for line in self.results.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    latest[f"{record['id']}-{record['seed']}"] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that image is simply done again
        return {
            key
            for key, r in latest.items()
            if r.get("status") == "ok" and (self.folder / str(r.get("image"))).is_file()
        }

    def write(self, rendered: Rendered) -> dict[str, Any]:
        record = dict(rendered.record)
        if rendered.png is not None:
            name = f"{rendered.key}.png"
            part = self.folder / f"{name}.part"
            part.write_bytes(rendered.png)
            os.replace(part, self.folder / name)
            record["image"] = name
        self._append(record)
        return record

    def report_bad(self, bad: BadJob) -> None:
        self._append({"id": bad.id, "line": bad.line, "status": "bad", "problems": [bad.reason]})

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
