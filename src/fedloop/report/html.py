"""One self-contained HTML page: inline CSS, PNGs as base64 data URIs, no external resource."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
.note { color: #555; font-size: 0.9em; }
details { margin: 1em 0; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td>{value:,}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def _table(rows: Sequence[Mapping[str, Any]], skip: Sequence[str] = ()) -> str:
    if not rows:
        return '<p class="note">none</p>'
    columns = [c for c in rows[0] if c not in skip]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _image(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(title, quote=True)
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def render_html(
    title: str,
    source: str,
    summary: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    local_models: Sequence[Mapping[str, Any]],
    images: Mapping[str, bytes],
) -> str:
    """Return the report page: summary, plots (embedded), the rounds and local-models tables."""
    made = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in summary.items())
    plots = "\n".join(
        f"<h3>{html.escape(name)}</h3>\n{_image(name, png)}" for name, png in images.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">From {html.escape(source)}; made {made}.</p>
<table>{facts}</table>
<h2>Plots</h2>
<p class="note">Black: the global model on the aggregator's held-out set (when the aggregator
has an <code>[evaluate]</code> engine). Solid colours: each agent's local model after that
round's training, as the agent reported it. Dashed: the same agent's evaluation of the round's
global model on its own data. Downloads are an estimate: every agent that trained from or
evaluated a global model is counted as one download of the whole stored blob.</p>
{plots or '<p class="note">no plots</p>'}
<h2>Rounds</h2>
{_table(rounds, skip=("created_at",))}
<details><summary>Local models ({len(local_models)})</summary>
{_table(local_models, skip=("agent_id", "created_at"))}
</details>
</body>
</html>
"""
