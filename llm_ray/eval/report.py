"""Eval outputs: ``report.json`` (everything), ``report.md`` (readable), ``summary.json`` (flat
``task.metric -> value`` figures, the file every stage command writes)."""

from __future__ import annotations

import json
import os
from typing import Any

from llm_ray.stage import SUMMARY, write_files

# How each metric is shown in report.md: scale and digits (BLEU is already 0-100).
_PERCENT = {"accuracy", "f1_macro", "rouge1", "rouge2", "rougeL", "meteor", "bertscore_precision", "bertscore_recall", "bertscore_f1"}


def flat_metrics(report: dict) -> dict[str, Any]:
    return {f"{name}.{k}": v for name, task in report["tasks"].items() for k, v in task["metrics"].items()}


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key in _PERCENT:
            return f"{100 * value:.2f}"
        return f"{value:.4g}" if abs(value) >= 1e4 or abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def one_line(text: Any, limit: int) -> str:
    """``text`` on one line (whitespace runs joined), cut to ``limit`` characters with an ellipsis."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def markdown_cell(text: Any, limit: int = 160) -> str:
    """A markdown table cell: one line (a cell cannot hold newlines), pipes escaped."""
    return one_line(text, limit).replace("|", "\\|")


def to_markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['model']}`", ""]
    lines += [f"Device {report['device']}, dtype {report['dtype']}, {report['seconds']:.1f} s in all.", ""]
    lines += ["| task | kind | prompt | examples | metric | value |", "|---|---|---|---|---|---|"]
    for name, task in report["tasks"].items():
        for key, value in task["metrics"].items():
            lines.append(f"| {name} | {task['kind']} | {task['prompt_style']} | {task['n_examples']} | {key} | {_fmt(key, value)} |")
    lines += ["", "Accuracy, F1, ROUGE, METEOR and BERTScore in percent; BLEU on sacrebleu's 0-100 scale.", ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    for name, task in report["tasks"].items():
        if not task.get("examples"):
            continue
        lines += ["", f"## {name}", "", "| prompt (end) | prediction | expected |", "|---|---|---|"]
        for ex in task["examples"]:
            expected = ex.get("target", " / ".join(ex.get("references", [])))
            lines.append(f"| {markdown_cell(ex['prompt'][-120:])} | {markdown_cell(ex['prediction'])} | {markdown_cell(expected)} |")
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out_dir: str) -> dict:
    """Write report.json, report.md and summary.json into ``out_dir``; return the summary."""
    summary = {"model": report["model"], "metrics": flat_metrics(report), "seconds": report["seconds"], "out_dir": os.path.abspath(out_dir)}
    write_files(out_dir, {
        "report.json": json.dumps(report, indent=2, ensure_ascii=False),
        "report.md": to_markdown(report),
        SUMMARY: json.dumps(summary, indent=2),
    })
    return summary
