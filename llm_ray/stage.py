"""The one result shape every stage returns: its output folder and its summary.

Each stage command writes ``summary.json`` into its output folder and prints the folder last,
so ``$(llm-ray STAGE ... | tail -1)`` composes stages; in Python a pipeline chains
``StageResult.out_dir`` the same way, with no special case per stage. No torch, no Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

SUMMARY = "summary.json"


@dataclass
class StageResult:
    out_dir: str  # local folder or storage URI (s3://...) holding summary.json
    summary: dict

    @property
    def run_dir(self) -> str:  # the name pretraining's callers have used
        return self.out_dir


def write_files(out_dir: str, files: dict[str, str]) -> None:
    """Write text files into a local folder (created if needed), each whole or absent (a
    temporary file renamed into place)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def write_summary(out_dir: str, summary: dict) -> StageResult:
    """Write ``summary.json`` into a local folder (created if needed) and return the result."""
    write_files(out_dir, {SUMMARY: json.dumps(summary, indent=2)})
    return StageResult(out_dir, summary)
