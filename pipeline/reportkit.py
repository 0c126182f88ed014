"""The report kit every stage report and the run report share: blocks, Markdown, self-contained HTML, PNG figures.

A report is a list of blocks (Heading, Paragraph, Bullets, Table, Definitions, Plot, Links) rendered twice, by
`render_markdown` and `render_html`, so the two files always say the same thing. Plots are PNG bytes: inline base64
in the HTML, and in the Markdown only as links to PNG files a stage saved (`images`).

Output is byte-identical for the same input: no timestamps, PNGs without the matplotlib version stamp, "\\n" line
ends on every platform. matplotlib is imported inside the figure helpers only, so importing this module (which
pipeline/stage.py does for the run-report hook's types) stays light.

Also here: the run report's per-stage hook types (`SectionContext`, `Section`; see pipeline/run_report.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import JpadaptError

DASH = "–"  # shown for a missing value (not computable, not recorded)
DPI = 100  # figures are sized in inches: 9 x 4.2 in -> 900 x 420 px
GIB = 2**30
# Fonts with Japanese glyphs, tried in order when a plot label is not ASCII (DejaVu Sans, matplotlib's default, has none).
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans JP", "IPAexGothic", "IPAGothic", "TakaoGothic", "VL Gothic",
             "Source Han Sans JP", "Hiragino Sans", "Yu Gothic", "MS Gothic")


# ---------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]  # right-align these columns


@dataclass(frozen=True)
class Definitions:
    items: list[tuple[str, str, str]]  # (name, csv column(s), definition)


@dataclass(frozen=True)
class Plot:
    png: bytes
    alt: str
    caption: str


@dataclass(frozen=True)
class Links:
    """Links to other reports, which come as a pair like this one (report.md and report.html): the Markdown links
    the `.md` file, the HTML the `.html` one."""

    items: list[tuple[str, str]]  # (text, path relative to this page, without the .md / .html suffix)


Block = Heading | Paragraph | Bullets | Table | Definitions | Plot | Links


def shift_headings(blocks: list[Block], by: int) -> list[Block]:
    return [Heading(b.text, min(6, b.level + by)) if isinstance(b, Heading) else b for b in blocks]


# ---------------------------------------------------------------------------------------------- number formats
# One place, so Markdown, HTML and plot labels agree.


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(value: Any, fmt: Callable[[Any], str]) -> str:
    return DASH if is_missing(value) else fmt(value)


def fmt_count(v: float) -> str:
    return f"{v:,.0f}"


def fmt_ratio(v: float) -> str:
    return f"{v:.2f}"


def fmt_score(v: float) -> str:
    return f"{v:.3f}"


def fmt_times(v: float) -> str:
    return f"{v:.2f}×"


def fmt_percent(v: float) -> str:
    # A handful of byte-fallback pieces in a million tokens must not read as "0.0%", which looks like none at all.
    if 0 < abs(v) < 0.0005:
        return "<0.1%"
    return f"{100 * v:.1f}%"


def fmt_flops(v: float) -> str:
    return f"{v:.2e}"


def fmt_gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def fmt_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.2g} s"  # a tiny model's planned GPU time: 0.037 s, not "0.0 s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


def fmt_money(amount: float) -> str:
    return f"${amount:.2g}" if 0 < amount < 0.01 else f"${amount:,.2f}"


# ---------------------------------------------------------------------------------------------- table text


def one_line(text: str) -> str:
    """A table cell holds one line: every line break (\\r, \\n, U+2028, ...) becomes a space."""
    return " ".join(text.splitlines())


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def text_cell(text: str) -> str:
    # An empty answer is a finding; a blank cell would hide it.
    return one_line(text) or DASH


# ---------------------------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |",
             "|" + "|".join("---:" if num else ":---" for num in table.numeric) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(blocks: list[Block], images: dict[int, str] | None = None) -> str:
    """Markdown of the blocks. Plots are left to the HTML, except those whose id() is in `images`: they become
    links to that PNG file (a path relative to the Markdown file)."""
    parts = []
    for block in blocks:
        if isinstance(block, Plot) and images and id(block) in images:
            parts.append(f"![{block.alt}]({images[id(block)]})")
        elif isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(markdown_table(block))
        elif isinstance(block, Definitions):
            parts.append("\n".join(f"- **{name}**" + (f" (`{key}`)" if key else "") + f": {text}"
                                   for name, key, text in block.items))
        elif isinstance(block, Links):
            parts.append("\n".join(f"- [{text}]({path}.md)" for text, path in block.items))
        # Other plots live in the HTML only.
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Noto Sans CJK JP", "Yu Gothic",
       Meiryo, sans-serif; color: #1d1d1f; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.4em 0 1em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e4e4; }
th { background: #f3f4f6; text-align: left; vertical-align: bottom; }
td:first-child { white-space: nowrap; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
dl dt { font-weight: 600; margin-top: 0.6em; }
dl dd { margin-left: 1.4em; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
img[data-broken] { outline: 3px solid #c00; }
""".strip()


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR comes first: 8-byte signature, length, type, then the sizes)."""
    return struct.unpack(">II", png[16:24])


def _html_table(table: Table) -> str:
    def cls(num: bool) -> str:
        return ' class="num"' if num else ""

    head = "".join(f"<th{cls(n)}>{html.escape(h)}</th>" for h, n in zip(table.header, table.numeric))
    body = "\n".join("<tr>" + "".join(f"<td{cls(n)}>{html.escape(c)}</td>" for c, n in zip(row, table.numeric))
                     + "</tr>" for row in table.rows)
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _html_plot(plot: Plot) -> str:
    width, height = png_size(plot.png)
    data = base64.b64encode(plot.png).decode("ascii")
    # onerror marks an image the browser could not decode, so a headless check can find it in the DOM.
    return (f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{html.escape(plot.alt)}" onerror="this.setAttribute(\'data-broken\', \'\')">'
            f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>")


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>\n" + "\n".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "\n</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Definitions):
        items = "\n".join(f"<dt>{html.escape(name)}" + (f" <code>{html.escape(key)}</code>" if key else "")
                          + f"</dt><dd>{html.escape(text)}</dd>" for name, key, text in block.items)
        return f"<dl>\n{items}\n</dl>"
    if isinstance(block, Plot):
        return _html_plot(block)
    if isinstance(block, Links):
        return "<ul>\n" + "\n".join(f'<li><a href="{html.escape(path)}.html">{html.escape(text)}</a></li>'
                                     for text, path in block.items) + "\n</ul>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(blocks: list[Block], title: str) -> str:
    """A self-contained page: inline CSS, plots as base64 PNGs, no URLs."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------- figures
# matplotlib's Agg renderer on a bare Figure: no pyplot, no global backend switch.


def cjk_font() -> str | None:
    """An installed font family with Japanese glyphs, or None."""
    from matplotlib import font_manager

    for family in CJK_FONTS:
        try:
            font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
            return family
        except ValueError:
            continue
    return None


def plot_labels(names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Display text for each name, and the font families to draw it with.

    ASCII names are drawn as they are in DejaVu Sans. A non-ASCII name is drawn with a CJK font behind DejaVu in the
    fallback list when one is installed; otherwise it is spelled with \\u escapes, which stay distinct and readable
    instead of turning into empty boxes.
    """
    names = list(names)
    families = ["DejaVu Sans"]
    cjk = cjk_font() if any(not n.isascii() for n in names) else None
    if cjk:
        families.append(cjk)
    labels = {}
    for name in names:
        text = name if (name.isascii() or cjk) else name.encode("ascii", "backslashreplace").decode("ascii")
        labels[name] = text.replace("$", r"\$")  # a lone '$' would start mathtext
    return labels, families


@contextmanager
def plot_style(families: list[str] | None = None) -> Iterator[None]:
    """matplotlib's default style (a user's matplotlibrc must not change a report), with these fonts if given."""
    from matplotlib import rc_context, style

    with style.context("default"), rc_context({"font.family": families} if families else {}):
        yield


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A constrained-layout Figure on the Agg canvas and its axes (one Axes, or an array of nrows x ncols)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols)


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # metadata Software=None drops the "matplotlib version ..." text chunk, so the bytes depend on the data only.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def render_plot(draw: Callable[[dict[str, str]], Any], names: Iterable[str]) -> bytes:
    """PNG of draw(labels) under plot_style, with the labels and fonts plot_labels picks for `names`."""
    labels, families = plot_labels(names)
    with plot_style(families):
        return png(draw(labels))


# ---------------------------------------------------------------------------------------------- files


def read_json(path: Path) -> Any:
    """A stage output a report needs: a missing or broken file is an error that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JpadaptError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise JpadaptError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; none when it is missing (optional outputs such as eval.jsonl)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_text(path: Path, text: str) -> None:
    # newline="" keeps "\n" on every platform, so the files are byte-identical everywhere.
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_texts_atomically(folder: Path, texts: dict[str, str | bytes]) -> list[Path]:
    """Write {file name: text} into folder (bytes as they are: a PNG), each through a temporary name renamed into
    place: an error leaves the previous files (or none) as they were, never a half-written one."""
    temporary = {name: folder / f".{name}.{os.getpid()}.tmp" for name in texts}
    try:
        for name, text in texts.items():
            if isinstance(text, bytes):
                temporary[name].write_bytes(text)
            else:
                write_text(temporary[name], text)
        paths = []
        for name in texts:
            os.replace(temporary[name], folder / name)
            paths.append(folder / name)
        return paths
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- run-report hook


@dataclass(frozen=True)
class SectionContext:
    """What a stage's `report_section` hook is handed: its committed stage folder and the run around it."""

    stage: str  # the stage's name, e.g. "cpt"
    run_dir: Path
    stages: dict[str, dict[str, Any]]  # {stage: manifest} of every committed stage, in pipeline order

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / "stages" / self.stage


@dataclass(frozen=True)
class Section:
    """A stage's part of the run report.

    title: its name in the "Reproduce" table ("Data").
    blocks: its content; the first block is its level-2 heading.
    sources: the files its numbers come from, relative to the run directory.
    images: the PNG file (relative to the run directory) report.md links for a plot, by id(plot).
    """

    title: str
    blocks: list[Block]
    sources: str
    images: dict[int, str] = field(default_factory=dict)


def nest(blocks: list[Block], stage: str, fallback_title: str) -> list[Block]:
    """A stage report's own blocks as one section of the run report: its title (first heading) becomes a level-2
    heading naming the stage, and its other headings shift so the highest of them sits at level 3."""
    body = list(blocks)
    title = fallback_title
    if body and isinstance(body[0], Heading):
        title = body.pop(0).text
    levels = [b.level for b in body if isinstance(b, Heading)]
    body = shift_headings(body, 3 - min(levels) if levels else 0)
    # "Instruction tuning (QLoRA)" -> "Instruction tuning (QLoRA, sft)"; "Evaluation" -> "Evaluation (evaluate)"
    named = f"{title[:-1]}, {stage})" if title.endswith(")") else f"{title} ({stage})"
    return [Heading(named, 2), *body]


def saved_plot(stage_dir: Path, blocks: list[Block], name: str) -> dict[int, str]:
    """{id(plot): name} for the first plot when the stage saved it as `name`; report.md links nothing otherwise."""
    plots = [b for b in blocks if isinstance(b, Plot)]
    return {id(plots[0]): name} if plots and (stage_dir / name).is_file() else {}


def stage_report_section(ctx: SectionContext, title: str, blocks: list[Block], files: tuple[str, ...],
                         plots: dict[int, str], note: str = "") -> Section:
    """A stage's own report (blocks with a level-1 title) as its run-report section.

    files: the stage files its numbers come from; plots: the PNG file name in the stage folder of a plot, by
    id(plot); note: said after the pointer to the stage's own report.html.
    """
    folder = f"stages/{ctx.stage}"
    where = (f"From {folder}/ ({', '.join(files)}); the stage's own report{note}: {folder}/report.html.")
    return Section(title=title, blocks=[*nest(blocks, ctx.stage, title), Paragraph(where)],
                   sources=", ".join(f"{folder}/{name}" for name in files),
                   images={key: f"{folder}/{name}" for key, name in plots.items()})
