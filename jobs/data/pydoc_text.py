"""Python standard-library docstrings as plain English text: held-out text for the tiny models
(the modules in HELDOUT, shipped as ``eval/pydoc_heldout.txt``) and, on request, a training
text from every other module (``--train``, written where you say, not shipped).

The bundled ``tiny_corpus.txt`` is the language reference's help topics; module docstrings are
the library reference, so the held-out file shares the style and none of the text (no 8-word
run of it appears in the corpus). Licence: PSF-2.0, as the CPython sources they come from.
Other Python versions give slightly different text.

    python3 jobs/data/pydoc_text.py --heldout jobs/data/eval/pydoc_heldout.txt
    python3 jobs/data/pydoc_text.py --train runs/distill-data/pydoc_train.txt
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import warnings

HELDOUT = ["json", "csv", "argparse", "collections", "itertools", "functools", "pathlib", "datetime", "logging",
           "subprocess", "threading", "dataclasses", "unittest", "sqlite3", "shutil", "tempfile", "heapq", "bisect",
           "random", "statistics", "decimal", "fractions", "textwrap", "contextlib", "enum", "pickle", "copy", "zipfile",
           "tarfile", "gzip", "hashlib", "secrets", "uuid", "urllib.parse", "http.client", "socket", "queue", "calendar",
           "glob", "fnmatch", "difflib", "shlex", "configparser", "email.message", "timeit", "doctest", "ast", "tokenize"]
SKIP = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data")


def module_text(name: str, limit: int | None) -> str:
    """The module's docstring and those of its public functions and classes (longer than 80
    characters), the first ``limit`` characters."""
    mod = importlib.import_module(name)
    text = inspect.getdoc(mod) or ""
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        doc = inspect.getdoc(obj) if getattr(obj, "__module__", "") == mod.__name__ else None
        if doc and len(doc) > 80:
            text += "\n\n" + doc
    return text.strip()[:limit]


def train_modules() -> list[str]:
    """Top-level standard-library modules (``sys.stdlib_module_names``) not held out."""
    held = {m.split(".")[0] for m in HELDOUT}
    return sorted(n for n in sys.stdlib_module_names if n not in held and not n.startswith("_") and not n.startswith(SKIP))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", help="write the held-out text here")
    ap.add_argument("--train", help="write the training text (every other stdlib module) here")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.heldout:
        with open(args.heldout, "w", encoding="utf-8") as f:
            f.write("\n\n".join(t for t in (module_text(m, 1200) for m in HELDOUT) if t) + "\n")
    if args.train:
        parts = []
        for name in train_modules():
            try:
                parts.append(module_text(name, None))
            except Exception:  # modules that need a platform or a missing C library
                continue
        os.makedirs(os.path.dirname(os.path.abspath(args.train)), exist_ok=True)
        with open(args.train, "w", encoding="utf-8") as f:
            f.write("\n\n".join(p for p in parts if p) + "\n")


if __name__ == "__main__":
    main()
