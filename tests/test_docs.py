"""The project's own documentation: nothing a user reads points outside the project, every docs link
resolves, and the worked example of docs/data.md writes a dataset that `mmart validate` accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmart.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = ("data.md", "architecture.md", "evaluation.md", "configs.md", "launching.md", "experiments.md")
# What users read: the package (help texts, errors, docstrings), scripts, configs, README and docs.
USER_READ = [ROOT / "mmart", ROOT / "scripts", ROOT / "configs", ROOT / "README.md", ROOT / "CHANGELOG.md", DOCS]
# The team's design notes, which the project does not ship.
OUTSIDE = re.compile(r"\b(?:DATA|ARCHITECTURE|NOTES|PERF|EVAL|STYLE)\.md\b|\.\./shared|shared/design")
DOCS_PATH = re.compile(r"\bdocs/[\w./-]+?\.md(?:#[\w-]+)?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text_files():
    for top in USER_READ:
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                try:
                    yield path, path.read_text()
                except UnicodeDecodeError:  # images, safetensors
                    continue


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # a '#' comment in a code block is no heading
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _check_target(target: str, base: Path, where: str) -> list[str]:
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else None
    if file is not None and not file.exists():
        return [f"{where}: {target} does not exist"]
    md = file if file is not None else None
    if anchor and md is not None and md.suffix == ".md" and anchor not in _anchors(md):
        return [f"{where}: {target}: no heading with anchor #{anchor} in {md.name}"]
    return []


def test_the_docs_exist():
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(DOC_FILES)


def test_nothing_a_user_reads_points_outside_the_project():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in _text_files() for m in OUTSIDE.finditer(text)]
    assert not found, "design notes are not shipped; point to docs/<topic>.md instead:\n" + "\n".join(found)


def test_every_link_in_the_docs_and_the_readme_resolves():
    broken = []
    for md in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            base = md.parent
            if target.startswith("#"):
                target = md.name + target
            broken += _check_target(target, base, md.relative_to(ROOT).as_posix())
    assert not broken, "\n".join(broken)


def test_every_docs_path_named_in_the_code_and_the_readme_exists():
    named = [(path, m.group(0)) for path, text in _text_files() if DOCS not in path.parents
             for m in DOCS_PATH.finditer(text)]
    assert any(path.name == "contract.py" for path, _ in named)  # the contract's errors point to docs/data.md
    broken = [e for path, target in named for e in _check_target(target, ROOT, str(path.relative_to(ROOT)))]
    assert not broken, "\n".join(broken)


def test_the_readme_opens_with_the_three_commands_ci_reads():
    """CI takes the install, main-job and test commands from the README's first bash block, by their comments."""
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    commands = {line.split("#", 1)[1].strip().split(",")[0].split(" (")[0]: line.split("#", 1)[0].strip()
                for line in block.splitlines() if "#" in line}
    assert commands == {"install": 'pip install -e ".[dev]"', "the main job": "bash scripts/train.sh",
                        "the tests": "pytest"}, block


def test_the_readme_recipes_table_lists_every_shipped_config():
    """A config added to configs/ gets a row (what it trains, hardware, time, measured value) in the README."""
    text = (ROOT / "README.md").read_text()
    recipes = text.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([\w.]+\.yaml)` \|", recipes, re.M))
    assert rows == {p.name for p in (ROOT / "configs").glob("*.yaml")}


def test_the_worked_example_writes_a_dataset_mmart_validate_accepts(tmp_path, monkeypatch, capsys):
    """docs/data.md's own-catalog snippet, run as a reader would (from a folder where it writes data/),
    prints what the page says it prints, and `mmart validate` finds the dataset valid."""
    text = (DOCS / "data.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "to_parquet" in b)
    (tmp_path / "make_catalog.py").write_text(snippet)
    run = subprocess.run([sys.executable, "make_catalog.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in text  # the output shown on the page
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "data/my_catalog"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == "data/my_catalog: valid" and out in text


def _commands(text: str) -> list[str]:
    """The `mmart ...` command lines of a page's bash code blocks (``\\`` continuations joined, comments
    dropped), including what follows ``-m mmart.cli`` in an ``accelerate launch`` line."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("bash", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "-m mmart.cli " in line:
                line = "mmart " + line.split("-m mmart.cli ", 1)[1]
            if line.startswith("mmart ") and not re.search(r"[<\[]|\.\.\.", line):  # placeholders
                out.append(line)
    return out


def test_the_worked_example_config_loads(tmp_path, monkeypatch):
    """docs/data.md's pipeline config for the example catalog is a valid config that points at it."""
    from mmart.config import PipelineConfig, load_config

    text = (DOCS / "data.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "inherit: default.yaml" in b)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_catalog.yaml").write_text(block)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(PipelineConfig, "data/my_catalog.yaml")
    assert (cfg.data_dir, cfg.output_dir) == ("data/my_catalog", "outputs/my_catalog")
    assert cfg.prompt.answer == "per_candidate"  # the rest comes from configs/default.yaml


@pytest.mark.parametrize("doc", ["README.md", *(f"docs/{d}" for d in DOC_FILES)])
def test_every_mmart_command_in_the_docs_parses(doc, capsys):
    """Each documented `mmart` command names a real stage and real options (argparse accepts it)."""
    import shlex

    from mmart.cli import build_parser

    commands = _commands((ROOT / doc).read_text())
    bad = []
    for cmd in commands:
        try:
            build_parser().parse_args(shlex.split(cmd)[1:])
        except SystemExit:
            bad.append(f"{cmd}\n    {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not bad, f"{doc}: commands argparse refuses:\n" + "\n".join(bad)
    if doc.endswith(("launching.md", "data.md", "configs.md")):
        assert commands, f"{doc} documents no mmart command?"
