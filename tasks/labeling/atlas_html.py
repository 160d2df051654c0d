"""HTML pieces of the atlas: the page shell, tokens with visible whitespace, compact log-scale histograms.

Tokens are shown as the model sees them, so whitespace is made visible: a newline is `↵`, a tab `⇥`, other
control characters their control pictures (`␜`), and a space `·` wherever it carries the meaning (a
whitespace-only token in a context; every token in a token table, where " cat" and "cat" are different
tokens). Histograms are inline SVG, a few lines high, with the count axis on a log scale (bins differ by
orders of magnitude), each bar titled with its range and count.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["page", "show_text", "show_token", "svg_histogram", "table"]

STYLE = """body{font-family:system-ui,sans-serif;margin:1.2em 2em;max-width:80em;color:#222}
h1{font-size:1.4em;margin:.3em 0}h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;font-size:.92em}td,th{padding:.15em .6em;border-bottom:1px solid #e4e4e4;
text-align:left;vertical-align:top}th{background:#f6f6f6;position:sticky;top:0}
th.sort{cursor:pointer;user-select:none}th.sort:after{content:" ⇅";color:#bbb}
th.asc:after{content:" ▲";color:#c60}th.desc:after{content:" ▼";color:#c60}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:.9em}
mark{background:rgba(255,120,0,var(--a));padding:0 .1em}.tok{background:rgba(255,120,0,var(--a))}
mark.peak{outline:1px solid #c60}.none{color:#999}.ws{color:#99a}.tokc{font-family:ui-monospace,monospace}
.meta{color:#555}.effect{color:#555;font-size:.95em}.pos{color:#070}.neg{color:#a00}
.cols{display:flex;gap:2.5em;flex-wrap:wrap}.hist{display:inline-block;margin-right:2em;vertical-align:top}
.hist svg{display:block}.hist .cap{font-size:.8em;color:#555}input{margin-right:1em}
#tryit textarea{width:100%;max-width:60em;font-family:ui-monospace,monospace}"""


def page(title: str, body: str, script: str = "", body_attrs: str = "") -> str:
    """A whole page: inline style, no external resource (opens from disk, no network)."""
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body{body_attrs}>{body}{tail}</body></html>"
    )


_SYMBOLS = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def show_token(token: str, spaces: bool = True) -> str:
    """Escaped `token` with newlines, tabs (and with `spaces`, spaces) shown as grey symbols.

    Without `spaces`, spaces stay plain unless the token is only whitespace (then it would be invisible)."""
    return _visible(token, spaces or not token.strip())


def _visible(token: str, visible_spaces: bool) -> str:
    out = []
    for ch in token:
        if ch in _SYMBOLS:
            out.append(f'<span class="ws">{_SYMBOLS[ch]}</span>')
        elif ch == " " and visible_spaces:
            out.append('<span class="ws">·</span>')
        elif ord(ch) < 0x20:  # other control characters: their Unicode "control picture" (U+2400 + code)
            out.append(f'<span class="ws">{chr(0x2400 + ord(ch))}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out) if out else '<span class="ws">∅</span>'


def show_text(text: str) -> str:
    """Escaped running text with newlines and tabs visible (one line per context), spaces plain."""
    return _visible(text, False) if text else ""


def svg_histogram(
    counts: Sequence[int],
    lo: float,
    hi: float,
    *,
    caption: str,
    marker: float | None = None,
    width: int = 240,
    height: int = 56,
) -> str:
    """Bars for `counts` over equal bins of [lo, hi], heights log(1 + count); an optional marker line at x."""
    n = len(counts)
    if n == 0:
        return ""
    top = math.log1p(max(counts)) or 1.0
    bar_w = width / n
    step = (hi - lo) / n
    bars = []
    for i, c in enumerate(counts):
        h = height * math.log1p(c) / top
        tip = f"{lo + i * step:.3g} to {lo + (i + 1) * step:.3g}: {c}"
        bars.append(
            f'<rect x="{i * bar_w:.1f}" y="{height - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4a7"><title>{html.escape(tip)}</title></rect>'
        )
    if marker is not None and hi > lo:
        x = width * min(max((marker - lo) / (hi - lo), 0.0), 1.0)
        bars.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#c60" stroke-width="2"/>')
    return (
        f'<div class="hist"><svg width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(caption)}">{"".join(bars)}</svg>'
        f'<div class="cap">{html.escape(caption)}: {lo:.3g} … {hi:.3g}; bar height log(1 + count), '
        f"max {max(counts)}</div></div>"
    )


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A plain table; cells are HTML already escaped by the caller."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
