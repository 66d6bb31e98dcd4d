"""`index.html` of a saliency run: one row per case with the report's thumbnail, the probabilities and
relative links to the case's files."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{width:360px}")


def _link(name: str, label: str) -> str:
    return f'<a href="{html.escape(quote(name))}">{html.escape(label)}</a>'


def index_row(case_id: str, report: str, probabilities: Mapping[str, Mapping[str, Any]],
              files: Sequence[tuple[str, str]]) -> str:
    """One `<tr class="case">`: thumbnail (linked to the full report), each task's predicted class and
    probabilities, and links (file name, label) to the case's files in the same folder."""
    probs = "<br>".join(
        f"<b>{html.escape(t)}</b>: {html.escape(str(r.get('class_name', r.get('class'))))} "
        f"({', '.join(f'{p:.3f}' for p in r['probabilities'])})" for t, r in probabilities.items())
    links = "<br>".join(_link(name, label) for name, label in files)
    thumb = f'<a href="{html.escape(quote(report))}"><img src="{html.escape(quote(report))}" alt="report"></a>'
    return (f'<tr class="case" data-case-id="{html.escape(case_id, quote=True)}"><td>{html.escape(case_id)}</td>'
            f"<td>{thumb}</td><td>{probs}</td><td>{links}</td></tr>")


def write_index(path: str | os.PathLike, rows: Sequence[str], title: str = "IGReg predictions") -> None:
    """Write the page at `path` from rows made by :func:`index_row` (already in display order)."""
    body = "\n".join(rows)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(rows)} case(s). Probabilities: the classes in the order of the model's class names.</p>"
            "<table><thead><tr><th>case</th><th>report</th><th>prediction</th><th>files</th></tr></thead>"
            f"<tbody>\n{body}\n</tbody></table></body></html>\n")
    Path(path).write_text(page, encoding="utf-8")
