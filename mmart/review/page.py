"""``index.html``: one self-contained page listing every member's grid with the choices as text.

No network, no external CSS or JS (a Content-Security-Policy forbids both, and scripts at all),
images lazy-loaded from ``grids/``. Every string that comes from data (ids, names, genres,
captions, paths, the model's rationales) goes through :func:`esc`, so a title named
``<script>...`` is shown, not run. A model's rationale gets a row under its title's row; without
any, the page is byte for byte what it was before rationales existed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from mmart.review.grid import MARKS
from mmart.review.select import Filters, MemberReview, TitleRow


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class PageInfo:
    """What the page header says about the run."""

    source: str  # the predictions file or model folder the scores came from
    data_dir: str
    split: str
    seed: int
    filters: Filters
    eligible_members: int  # members passing the filters, before sampling
    demo: bool  # oracle.parquet present


@dataclass
class GridFile:
    review: MemberReview
    rel_path: str  # relative to the page, e.g. grids/003_u0042.png
    size: tuple[int, int]


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #141414; background: #f6f6f6; }
header, main > section { background: #fff; margin: 12px auto; padding: 14px 20px; max-width: 1400px;
  border: 1px solid #ddd; border-radius: 6px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 19px; margin: 0; display: inline-block; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
dt { color: #555; } dd { margin: 0; overflow-wrap: anywhere; }
nav.members { columns: 4 14em; margin: 8px 0 0; padding-left: 20px; }
nav.step { display: inline-block; margin-left: 16px; }
nav.step a, nav.step span { margin-right: 12px; }
table { border-collapse: collapse; margin: 10px 0; width: 100%; font-size: 14px; }
th, td { text-align: left; vertical-align: top; border-bottom: 1px solid #e2e2e2; padding: 4px 8px 4px 0; }
th { color: #555; font-weight: 600; }
.mark { display: inline-block; width: 12px; height: 12px; border: 4px solid; box-sizing: border-box;
  vertical-align: -1px; margin-right: 4px; }
.legend li { list-style: none; } .legend { padding-left: 0; margin: 6px 0; }
.muted { color: #5a5a5a; } .win { font-weight: 600; } .loss { font-weight: 600; }
.grid { overflow-x: auto; } .grid img { display: block; max-width: none; border: 1px solid #e2e2e2; }
"""
# Added only to pages that show a rationale: the title's row and its rationale's read as one.
WHY_CSS = """tr.with-why td { border-bottom: 0; padding-bottom: 0; }
td.why { padding: 2px 8px 6px 1.5em; overflow-wrap: anywhere; }
"""
WHY_LABEL = "Why (the model's words):"


def _choice(row: TitleRow, artwork_id: str | None, with_prob: bool = True) -> str:
    cand = row.candidate(artwork_id)
    if cand is None:
        return '<span class="muted">-</span>'
    parts = [f"{esc(cand.letter)}: {esc(cand.artwork_id)}"]
    if with_prob:
        parts.append(f"model {100 * cand.prob:.1f}%")
    if cand.true_p is not None:
        parts.append(f"true p {cand.true_p:.3f}")
    text = ", ".join(parts)
    if cand.caption:
        text += f'<br><span class="muted">{esc(cand.caption)}</span>'
    return text


def _outcome(row: TitleRow) -> str:
    o = row.outcome
    if o is None:
        return '<span class="muted">unknown (no oracle)</span>'
    diff = (row.true_p(row.model_choice) or 0) - (row.true_p(row.production_choice) or 0)
    return {"win": f'<span class="win">win ({diff:+.2f})</span>', "loss": f'<span class="loss">loss ({diff:+.2f})</span>',
            "tie": "tie (same choice)"}[o]


def _why_row(rationale: str, span: int) -> str:
    """The model's own explanation, under its title and labelled as the model's (not a fact about the title)."""
    return f'<tr><td class="why" colspan="{span}"><span class="muted">{WHY_LABEL}</span> {esc(rationale)}</td></tr>'


def _member_section(i: int, g: GridFile, grids: list[GridFile], demo: bool) -> str:
    r = g.review
    prev_link = f'<a href="#m{i - 1}">&larr; previous ({esc(grids[i - 1].review.user_id)})</a>' if i > 0 \
        else '<span class="muted">&larr; previous</span>'
    next_link = f'<a href="#m{i + 1}">next ({esc(grids[i + 1].review.user_id)}) &rarr;</a>' if i + 1 < len(grids) \
        else '<span class="muted">next &rarr;</span>'
    head = ["Title", "Genres", "Model's choice", "Played"]
    if demo:
        head[3:3] = ["Production's choice", "Oracle's choice"]
        head.append("vs production")
    out = [f'<section id="m{i}">',
           f"<h2>Member {esc(r.user_id)}</h2>",
           f'<nav class="step" aria-label="members">{prev_link} <a href="#members">all members</a> {next_link}</nav>',
           "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in r.rows:
        cells = [f"{esc(row.name)}<br><span class=\"muted\">{esc(row.title_id)}"
                 + (f", {esc(row.year)}" if row.year else "") + "</span>",
                 esc(", ".join(row.genres)),
                 _choice(row, row.model_choice)]
        if demo:
            cells += [_choice(row, row.production_choice), _choice(row, row.oracle_choice)]
        played = _choice(row, row.played) if row.played else '<span class="muted">not played</span>'
        if row.shown_no_play:
            played += f'<br><span class="muted">shown, no play: {esc(", ".join(row.shown_no_play))}</span>'
        cells.append(played)
        if demo:
            cells.append(_outcome(row))
        out.append(('<tr class="with-why">' if row.rationale else "<tr>")
                   + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        if row.rationale:
            out.append(_why_row(row.rationale, len(cells)))
    out.append("</tbody></table>")
    if r.history:
        recent = "; ".join(f"{h.name} ({', '.join(h.genres)}{f', rated {h.rating}/5' if h.rating else ''})"
                           for h in r.history)
        out.append(f'<p class="muted">Recent history, most recent first: {esc(recent)}</p>')
    w, h = g.size
    alt = f"Review grid for member {r.user_id}: " + "; ".join(
        f"{row.name}: model chose {row.model_choice}" for row in r.rows)
    out.append(f'<div class="grid"><img src="{esc(quote(g.rel_path))}" width="{w}" height="{h}" loading="lazy" '
               f'alt="{esc(alt)}"></div>')
    out.append("</section>")
    return "\n".join(out)


def render_page(grids: list[GridFile], info: PageInfo) -> str:
    """The whole page as a string."""
    demo = info.demo
    n_rows = sum(len(g.review.rows) for g in grids)
    dl = [("scores from", esc(info.source)), ("dataset", esc(info.data_dir)), ("split", esc(info.split)),
          ("members", f"{len(grids)} shown of {info.eligible_members} matching the filters (seed {info.seed})"),
          ("titles", str(n_rows)), ("filters", esc(info.filters.describe()))]
    if demo:
        counts = {o: sum(g.review.count(o) for g in grids) for o in ("win", "loss", "tie")}
        dl.append(("vs production", f"{counts['win']} win(s), {counts['loss']} loss(es), {counts['tie']} tie(s), "
                                    "by true play probability (oracle.parquet)"))
    else:
        dl.append(("vs production", "unknown: the dataset has no oracle.parquet (real data), so true values, the "
                                    "oracle's and production's choices are not shown"))
    n_why = sum(bool(row.rationale) for g in grids for row in g.review.rows)
    if n_why:
        dl.append(("rationales", f"{n_why} of {n_rows} titles: the model's own one-line explanation of its choice "
                                 "(the predictions' rationale column), shown as written; it need not match the "
                                 "probabilities"))
    legend = "".join(
        f'<li><span class="mark" style="border-color: rgb{m.frame}"></span><b>{m.label}</b>: {esc(m.meaning)} '
        f'({("outer", "middle", "inner")[m.ring]} frame)</li>'
        for m in MARKS if demo or m.key != "oracle")
    members = "".join(
        f'<li><a href="#m{i}">{esc(g.review.user_id)}</a> <span class="muted">({len(g.review.rows)} title'
        f'{"s" * (len(g.review.rows) != 1)}'
        + (f", {g.review.count('win')}W/{g.review.count('loss')}L" if demo else "") + ")</span></li>"
        for i, g in enumerate(grids))
    sections = "\n".join(_member_section(i, g, grids, demo) for i, g in enumerate(grids))
    csp = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmart review: {esc(info.split)}, {len(grids)} members</title>
<link rel="icon" href="data:,">
<style>{CSS + (WHY_CSS if n_why else "")}</style>
</head>
<body>
<header>
<h1>mmart review: what the model saw and what it chose</h1>
<dl>{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in dl)}</dl>
<p class="muted">Each grid shows the member's recent history, then one row per title with every candidate artwork in
the order the model saw it (letters), labelled with the model's probability. The grids print text in ASCII
(accents dropped); the tables here carry the exact strings. Marks:</p>
<ul class="legend">{legend}</ul>
<h2 id="members">Members</h2>
<nav class="members" aria-label="all members"><ol>{members}</ol></nav>
</header>
<main>
{sections}
</main>
</body>
</html>
"""


def write_page(out_dir: Path, grids: list[GridFile], info: PageInfo) -> Path:
    path = Path(out_dir) / "index.html"
    path.write_text(render_page(grids, info), encoding="utf-8")
    return path
