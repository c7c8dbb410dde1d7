"""Local text inputs (``data.paths``): find the files, split them into documents.

A document is a run of non-empty lines; one or more blank lines separate documents. Both
functions are deterministic (sorted file order), so every worker sees the same documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from llm_ray.config.loader import RecipeError

# One or more empty (or whitespace-only) lines end a document; \s also covers "\r\n" files.
_BLANK_LINES = re.compile(r"\n\s*\n")


def list_text_files(paths: list[str]) -> list[str]:
    """Expand files and folders (recursively, ``*.txt``) into a sorted list of files.

    A path that names nothing is the recipe's error (``data.paths``), reported as one line.
    """
    files: set[str] = set()
    for p in paths:
        path = Path(p)
        if path.is_file():
            files.add(str(path))
        elif path.is_dir():
            files.update(str(f) for f in path.rglob("*.txt") if f.is_file())
        else:
            raise RecipeError("data.paths", f"{p!r} does not exist (expected a text file or a folder)")
    if not files:
        raise RecipeError("data.paths", f"no *.txt files found under {paths!r}")
    return sorted(files)


def iter_documents(files: list[str]) -> Iterator[str]:
    """Yield the documents of ``files`` in order, one file in memory at a time."""
    for f in files:
        # errors="replace" keeps a stray bad byte from killing a run; issue 3 replaces this
        # with proper validation that quarantines bad files and reports them.
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        for doc in _BLANK_LINES.split(text):
            doc = doc.strip()
            if doc:
                yield doc


def read_documents(files: list[str]) -> list[str]:
    """All documents of ``files``: split on blank lines, stripped, empty ones skipped."""
    return list(iter_documents(files))
