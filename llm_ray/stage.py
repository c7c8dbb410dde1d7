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


def write_summary(out_dir: str, summary: dict) -> StageResult:
    """Write ``summary.json`` into a local folder (created if needed) and return the result."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    return StageResult(out_dir, summary)
