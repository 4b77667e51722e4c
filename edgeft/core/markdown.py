"""Markdown text written into report.md and parity.md: names and paths as table cells.

Class names and file paths come from the user's folder, so they may hold `|` (which would add a
table column), `<` / `>` (raw HTML such as `<script>` in a rendered report) or line breaks (which
would end the table row). No TensorFlow here: train/report.py and verify/parity.py both use it.
"""
from __future__ import annotations

_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"))


def md_cell(value) -> str:
    """`value` as text safe inside a Markdown table cell (and anywhere in running text): `&`, `<`
    and `>` become HTML entities, `|` is escaped, and every line break becomes `<br>`."""
    text = str(value)
    for raw, safe in _ESCAPES:
        text = text.replace(raw, safe)
    return "<br>".join(text.splitlines())
