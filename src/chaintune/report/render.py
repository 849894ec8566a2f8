"""The report's rendering: the builder that collects sections of text, figures and tables (saving each figure as
PNG + PDF and each table as CSV + Markdown as it is added), and the HTML and Markdown renderers of the result."""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from chaintune.formatting import display_frame
from chaintune.rundir import Folder
from chaintune.report.style import DPI, RC


def _md_table(df: pd.DataFrame, numeric: Sequence[str]) -> str:
    return df.to_markdown(index=False, disable_numparse=True,
                          colalign=["right" if c in numeric else "left" for c in df.columns])


def _html_table(df: pd.DataFrame, numeric: Sequence[str]) -> str:
    esc = html.escape
    cls = {c: ' class="n"' if c in numeric else "" for c in df.columns}
    head = "".join(f"<th{cls[c]}>{esc(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td{cls[c]}>{esc(str(v))}</td>" for c, v in zip(df.columns, row)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class _Item:
    kind: str  # "figure" | "table" | "text"
    name: str = ""
    caption: str = ""
    png: bytes = b""
    width_in: float = 0.0
    table: pd.DataFrame | None = None
    numeric: list[str] = field(default_factory=list)
    text: str = ""


@dataclass
class _Section:
    title: str
    items: list[_Item] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


class _Builder:
    """Collects sections; saves every figure (PNG + PDF) and table (CSV + Markdown) as it is added."""

    def __init__(self, folder: Folder, out_dir: Path):
        self.folder, self.out_dir = folder, out_dir  # every file is written through `folder` (no symlinked subfolder)
        self.sections: list[_Section] = []
        self.names: dict[str, set[str]] = {"figure": set(), "table": set()}

    def section(self, title: str) -> _Section:
        self.sections.append(_Section(title))
        return self.sections[-1]

    def _name(self, name: str, kind: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or kind
        name, k = base, 2
        while name in self.names[kind]:
            name, k = f"{base}_{k}", k + 1
        self.names[kind].add(name)
        return name

    def figure(self, section: _Section, name: str, fig: Figure, caption: str) -> None:
        name = self._name(name, "figure")
        buf = io.BytesIO()
        with mpl.rc_context(RC):
            fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
            with self.folder.atomic(self.out_dir / "figures" / f"{name}.pdf") as tmp:
                fig.savefig(tmp, format="pdf", facecolor="white", metadata={"CreationDate": None})
        with self.folder.atomic(self.out_dir / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(buf.getvalue())
        section.items.append(_Item("figure", name, caption, buf.getvalue(), float(fig.get_figwidth())))

    def table(self, section: _Section, name: str, df: pd.DataFrame, caption: str) -> None:
        name = self._name(name, "table")
        shown, numeric = display_frame(df)
        self.folder.write_text(self.out_dir / "tables" / f"{name}.csv", df.to_csv(index=False))
        self.folder.write_text(self.out_dir / "tables" / f"{name}.md", f"{caption}\n\n{_md_table(shown, numeric)}\n")
        section.items.append(_Item("table", name, caption, table=shown, numeric=numeric))

    def text(self, section: _Section, text: str) -> None:
        section.items.append(_Item("text", text=text))


PX_PER_INCH = 130  # on-screen size of the figures: 7 in → 910 px, 8 pt text → ~14 px

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;font-size:15px;line-height:1.45;
color:#222;max-width:1040px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2.2em}.meta{color:#555;font-size:.9em}nav{background:#f6f7f9;border:1px solid #e3e5e8;padding:8px 16px;
border-radius:4px;font-size:.92em}nav ol{margin:.3em 0;padding-left:1.4em}figure{margin:1.4em 0}
figure img{max-width:100%;height:auto;display:block;border:1px solid #eee}figcaption,.caption{font-size:.88em;
color:#444;margin-top:.35em}table{border-collapse:collapse;font-size:.8em;margin:.4em 0 1.2em;display:block;
overflow-x:auto;max-width:100%}th,td{border:1px solid #ddd;padding:2px 7px;text-align:left;white-space:nowrap}
th{background:#f2f3f5}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
details{margin:.4em 0 1.2em}summary{cursor:pointer;font-size:.88em;color:#333}
"""


def _html(b: _Builder, title: str, subtitle: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(subtitle)}</p>", "<nav><ol>"]
    parts += [f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in b.sections]
    parts.append("</ol></nav>")
    for s in b.sections:
        parts.append(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>')
        for it in s.items:
            if it.kind == "text":
                parts.append(f"<p>{it.text}</p>")  # built here from escaped pieces
            elif it.kind == "figure":
                data = base64.b64encode(it.png).decode("ascii")
                parts.append(f'<figure id="fig-{it.name}"><img src="data:image/png;base64,{data}" '
                             f'alt="{html.escape(it.name)}" style="width:{it.width_in * PX_PER_INCH:.0f}px">'
                             f"<figcaption><b>{html.escape(it.name)}</b>: {html.escape(it.caption)}</figcaption>"
                             "</figure>")
            else:
                assert it.table is not None
                table = _html_table(it.table, it.numeric)
                caption = f'<p class="caption"><b>{html.escape(it.name)}</b>: {html.escape(it.caption)}</p>'
                if len(it.table) > 25:
                    table = (f"<details><summary>{len(it.table)} rows (click to show; also "
                             f"tables/{html.escape(it.name)}.csv)</summary>{table}</details>")
                parts.append(caption + table)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown(b: _Builder, title: str, subtitle: str) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    lines += [f"{i}. [{s.title}](#{s.anchor})" for i, s in enumerate(b.sections, start=1)] + [""]
    for s in b.sections:
        lines += [f"## {s.title}", ""]
        for it in s.items:
            if it.kind == "text":
                text = re.sub(r"</?b>", "**", re.sub(r"<li>", "\n- ", it.text))
                lines += [html.unescape(re.sub(r"<[^>]+>", "", text)), ""]
            elif it.kind == "figure":
                lines += [f"![{it.name}](figures/{it.name}.png)", "", f"*{it.name}*: {it.caption}", ""]
            else:
                assert it.table is not None
                lines += [f"*{it.name}*: {it.caption}", "", _md_table(it.table, it.numeric), ""]
    return "\n".join(lines) + "\n"
