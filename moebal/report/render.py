"""Markdown and self-contained HTML from one document, so the two always say the same.

A document is a list of blocks: ``Heading``, ``Para`` (inline ``**bold**`` and
```code``` only), ``Table``, ``Bullets``, ``Code`` and ``Image`` (PNG bytes, linked by
file name in Markdown and inlined as base64 in HTML).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Union


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # one char per column: l, r or c (default l)


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str


@dataclass
class Image:
    path: str  # relative to the report
    alt: str
    png: bytes = field(repr=False, default=b"")


Block = Union[Heading, Para, Table, Bullets, Code, Image]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            align = (b.align or "l" * len(b.header)).ljust(len(b.header), "l")
            rule = {"l": ":---", "r": "---:", "c": ":---:"}
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join(rule[a] for a in align) + "|")
            for row in b.rows:
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Code):
            out.append("```\n" + b.text.rstrip("\n") + "\n```")
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})")
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {b!r}")
        out.append("")
    return "\n".join(out)


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline_html(text: str) -> str:
    # code spans first, so ** inside code stays literal
    parts = _CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            out.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
td.r, th.r { text-align: right; } td.c, th.c { text-align: center; }
code, pre { background: #f5f5f5; border-radius: 3px; }
code { padding: 0 3px; } pre { padding: 8px; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML file: styles inline and plots as base64 PNG."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            align = (b.align or "l" * len(b.header)).ljust(len(b.header), "l")
            rows = ["<tr>" + "".join(
                f'<th class="{a}">{_inline_html(h)}</th>' for h, a in zip(b.header, align)
            ) + "</tr>"]
            for row in b.rows:
                rows.append("<tr>" + "".join(
                    f'<td class="{a}">{_inline_html(str(c))}</td>' for c, a in zip(row, align)
                ) + "</tr>")
            body.append("<table>\n" + "\n".join(rows) + "\n</table>")
        elif isinstance(b, Bullets):
            body.append("<ul>\n" + "\n".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Code):
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.alt)}</figcaption></figure>"
            )
        else:  # pragma: no cover
            raise TypeError(f"unknown block {b!r}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
