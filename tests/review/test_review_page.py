"""index.html (escaping, self-contained, links) and the `mmart review` command (filters, errors)."""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from mmart.cli import main
from mmart.errors import UserError
from mmart.review import Filters, run_review
from mmart.review.select import sample_members

from fake_preds import fabricate_predictions

EVIL = "<script>alert(1)</script>"


class Links(HTMLParser):
    """Every tag's attributes, and the ids on the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"])


def parse(html: str) -> Links:
    p = Links()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def page(tiny_world, tiny_preds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("review_page")
    return run_review(tiny_world, out, preds=tiny_preds, members=5, seed=3, progress=False).index


def test_page_is_self_contained_with_lazy_images_and_working_links(page):
    html = page.read_text()
    doc = parse(html)
    imgs = [a for t, a in doc.tags if t == "img"]
    assert len(imgs) == 5
    for a in imgs:
        assert a["loading"] == "lazy" and a["alt"] and int(a["width"]) > 0 and int(a["height"]) > 0
        assert (page.parent / a["src"]).is_file()
    for t, a in doc.tags:
        assert t not in ("script", "iframe", "object", "embed")
        assert not (t == "link" and a.get("rel") == "stylesheet")
        for attr in ("src", "href"):
            url = a.get(attr) or ""
            assert not re.match(r"^(https?:)?//", url), f"external {attr} {url}"
            if url.startswith("#"):
                assert url[1:] in doc.ids, f"broken link {url}"
    hrefs = [a["href"] for t, a in doc.tags if t == "a"]
    assert {f"#m{i}" for i in range(5)} <= set(hrefs) and "#members" in hrefs
    assert "next (" in html and "previous (" in html


def test_data_strings_are_escaped(world_copy, tmp_path):
    preds = fabricate_predictions(world_copy)
    user, title = preds.iloc[0].user_id, preds.iloc[0].title_id
    titles = pd.read_parquet(world_copy / "titles.parquet")
    titles.loc[titles.title_id == title, "name"] = EVIL
    titles.loc[titles.title_id == title, "genres"] = pd.Series([["drama", '"><img src=x onerror=alert(2)>']],
                                                                index=titles.index[titles.title_id == title])
    titles.to_parquet(world_copy / "titles.parquet", index=False)
    arts = pd.read_parquet(world_copy / "artworks.parquet")
    arts.loc[arts.title_id == title, "caption"] = "<b onmouseover=alert(3)>caption</b> & more"
    arts.to_parquet(world_copy / "artworks.parquet", index=False)
    preds_path = tmp_path / "preds.parquet"
    preds.to_parquet(preds_path, index=False)

    html = run_review(world_copy, tmp_path / "out", preds=preds_path, filters=Filters(member=user),
                      progress=False).index.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert EVIL not in html and "<script" not in html.lower()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<b onmouseover" not in html and "&lt;b onmouseover=alert(3)&gt;caption&lt;/b&gt; &amp; more" in html
    # Nothing data-derived made it into a tag: the only tags are the page's own.
    assert {t for t, _ in parse(html).tags} <= {"html", "head", "meta", "title", "link", "style", "body", "header",
                                                 "h1", "h2", "dl", "dt", "dd", "p", "ul", "li", "b", "span", "nav",
                                                 "ol", "a", "main", "section", "table", "thead", "tbody", "tr", "th",
                                                 "td", "br", "div", "img"}


def test_cli_writes_page_and_prints_its_path(tiny_world, tiny_preds, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["review", "--preds", str(tiny_preds), "--data", str(tiny_world), "--out", str(out),
                 "--members", "2", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "index.html"))
    assert len(list((out / "grids").glob("*.png"))) == 2
    # A rerun with fewer members leaves no stale grid behind.
    assert main(["review", "--preds", str(tiny_preds), "--data", str(tiny_world), "--out", str(out),
                 "--members", "1"]) == 0
    assert len(list((out / "grids").glob("*.png"))) == 1


@pytest.mark.parametrize("only,outcome", [("wins", "win"), ("losses", "loss")])
def test_only_wins_or_losses(tiny_world, tiny_preds, tmp_path, only, outcome):
    res = run_review(tiny_world, tmp_path, preds=tiny_preds, members=0, filters=Filters(only=only), progress=False)
    rows = [row for r in res.reviews for row in r.rows]
    assert rows and all(row.outcome == outcome for row in rows)
    for row in rows:  # by true value: the oracle's play probability of each policy's choice
        mine, prod = row.true_p(row.model_choice), row.true_p(row.production_choice)
        assert (mine > prod) if outcome == "win" else (mine < prod)


def test_title_genre_member_filters(tiny_world, tiny_preds, tmp_path):
    preds = pd.read_parquet(tiny_preds)
    titles = pd.read_parquet(tiny_world / "titles.parquet").set_index("title_id")
    title = preds.title_id.value_counts().index[0]
    res = run_review(tiny_world, tmp_path / "t", preds=tiny_preds, members=0, filters=Filters(title=title),
                     progress=False)
    assert {row.title_id for r in res.reviews for row in r.rows} == {title}
    assert len(res.reviews) == preds[preds.title_id == title].user_id.nunique()

    genre = titles.loc[title, "genres"][0]
    res = run_review(tiny_world, tmp_path / "g", preds=tiny_preds, members=0, filters=Filters(genre=genre),
                     progress=False)
    assert res.reviews and all(genre in row.genres for r in res.reviews for row in r.rows)

    member = preds.user_id.iloc[-1]
    res = run_review(tiny_world, tmp_path / "m", preds=tiny_preds, filters=Filters(member=member), progress=False)
    assert [r.user_id for r in res.reviews] == [member]


def test_sampling_is_seeded(tiny_world, tiny_preds, tmp_path):
    ids = [f"u{i:04d}" for i in range(40)]
    assert sample_members(ids, 4, seed=7) == sample_members(list(reversed(ids)), 4, seed=7)
    assert sample_members(ids, 4, seed=7) != sample_members(ids, 4, seed=8)
    assert sample_members(ids, 0, seed=7) == ids == sample_members(ids, 99, seed=7)
    res = run_review(tiny_world, tmp_path, preds=tiny_preds, members=4, seed=7, progress=False)
    assert [r.user_id for r in res.reviews] == sample_members(pd.read_parquet(tiny_preds).user_id, 4, seed=7)


def test_no_oracle_wins_losses_is_a_clear_error_and_the_page_says_so(world_copy, tmp_path, capsys):
    preds = tmp_path / "p.parquet"
    fabricate_predictions(world_copy).to_parquet(preds, index=False)
    (world_copy / "oracle.parquet").unlink()
    code = main(["review", "--preds", str(preds), "--data", str(world_copy), "--out", str(tmp_path / "o"),
                 "--only", "wins"])
    err = capsys.readouterr().err
    assert code == 1 and "oracle.parquet" in err and "does not exist" in err and "drop --only" in err
    res = run_review(world_copy, tmp_path / "o", preds=preds, members=2, progress=False)
    assert "no oracle.parquet" in res.index.read_text()
    assert all(row.oracle_choice is None and row.outcome is None for r in res.reviews for row in r.rows)


@pytest.mark.parametrize("kwargs,message", [
    ({"filters": Filters(genre="opera")}, "genres in the catalog"),
    ({"filters": Filters(title="t9999")}, "no such title_id"),
    ({"filters": Filters(member="nobody")}, "no such user_id"),
    ({"split": "val"}, "no predictions for split 'val'"),
])
def test_user_errors_name_the_fix(tiny_world, tiny_preds, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_review(tiny_world, tmp_path, preds=tiny_preds, progress=False, **kwargs)


def test_bad_inputs_are_user_errors(tiny_world, tmp_path):
    with pytest.raises(UserError, match="--preds FILE"):
        run_review(tiny_world, tmp_path, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        run_review(tiny_world, tmp_path, preds=tmp_path / "missing.parquet", progress=False)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["u0000"], "title_id": ["t0000"]}).to_parquet(bad)
    with pytest.raises(UserError, match=r"lacks column\(s\) \['candidates', 'probs'\]"):
        run_review(tiny_world, tmp_path, preds=bad, progress=False)
    with pytest.raises(UserError, match="mmart_chooser.json"):
        run_review(tiny_world, tmp_path, model_dir=tmp_path, progress=False)


def test_review_script_runs_mmart_review(tiny_world, tiny_preds, tmp_path):
    script = Path(__file__).resolve().parents[2] / "scripts" / "review.sh"
    model = tmp_path / "model"  # --preds supplies the scores, so the model folder is only named
    model.mkdir()
    (model / "mmart_chooser.json").write_text("{}")
    r = subprocess.run(["bash", str(script), str(model), str(tiny_world), str(tmp_path / "out"),
                        "--preds", str(tiny_preds), "--members", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "index.html").is_file() and r.stdout.strip().endswith("out/index.html")
    assert len(list((tmp_path / "out" / "grids").glob("*.png"))) == 1
