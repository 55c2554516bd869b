"""House rules that keep mmart's layers and help texts honest.

* Layers only look down: no import cycle among mmart's modules, counting imports inside functions.
* A training stage's --help names the values its default config runs with, read from that config.
* Help says what a setting does, never what it scored once: no measured result in a help text,
  comment or docstring of mmart/ (results live in docs/experiments.md).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmart"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``root`` (a package is named by its folder)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (top level or inside a function).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``; a relative
    import resolves against the importing module's package. A submodule importing its own package's
    ``__init__`` is not an edge (Python has already run it), but importing a sibling is.
    """
    pkg = PACKAGE.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == pkg else None
                if r is None or r == m:
                    continue
                if m.startswith(r + ".") and mods[r].name == "__init__.py":
                    continue  # a module reading its own package: already imported before it
                graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    pkg = tmp_path / "mmart"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from mmart.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("from . import b\nimport mmart.sub\n")
    graph = import_graph(module_files(pkg))
    assert graph["mmart.sub.c"] == {"mmart.sub.b"}  # its own package is no edge, a sibling is
    assert cycles(graph) == [["mmart.a", "mmart.sub.b"]]


def test_no_import_cycles_in_mmart() -> None:
    found = cycles(import_graph(module_files()))
    assert not found, "import cycles (move the shared piece down a layer): " + "; ".join(" <-> ".join(c) for c in found)


# --- --help names the default config's values -------------------------------------------------------------------

# ``section.key=value`` in a stage's description or epilog states the value the stage runs with under the
# default --config; a setting's other values are described without ``=`` (e.g. "as prompt.answer says").
SETTING = re.compile(r"\b(world|vision|cache|prompt|model|sft|dpo|eval)\.([a-z_0-9]+)=([^\s,;)]*[^\s,;).:])")


def _stage_parsers():
    from mmart.cli import build_parser

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    return list(walk(build_parser(), "mmart"))


def _described(parser) -> str:
    """The description and epilog as --help prints them (argument helps hold --set examples, not defaults)."""
    formatter = parser._get_formatter()
    formatter.add_text(parser.description)
    formatter.add_text(parser.epilog)
    return formatter.format_help()


def _shown(value) -> str:
    return "null" if value is None else str(value)


@pytest.fixture(scope="module")
def default_config():
    from mmart.config import CONFIG_ROOT, PipelineConfig, load_config
    from mmart.train.cli import DEFAULT_CONFIG

    return load_config(PipelineConfig, CONFIG_ROOT.parent / DEFAULT_CONFIG)


def _stale(text: str, cfg) -> list[tuple[str, str, str]]:
    return [(s, k, v) for s, k, v in SETTING.findall(text) if v != _shown(getattr(getattr(cfg, s), k))]


def test_the_help_check_catches_a_stale_value(default_config) -> None:
    stale = "Fine-tune towards the teacher (sft.teacher=reward_model) on sft.examples=played; dpo.pairs=teacher."
    assert [(s, k) for s, k, _ in _stale(stale, default_config)] == [("sft", "teacher"), ("sft", "examples")]


def test_a_stage_help_names_only_the_values_its_default_config_runs_with(default_config) -> None:
    wrong = [f"`{name} --help` says {s}.{k}={v}, the default config runs {_shown(getattr(getattr(default_config, s), k))}"
             for name, parser in _stage_parsers() for s, k, v in _stale(_described(parser), default_config)]
    assert not wrong, "\n".join(wrong)


def test_sft_and_dpo_help_name_their_deciding_settings_with_the_fields_own_help(default_config, capsys) -> None:
    from mmart.cli import main
    from mmart.train.cli import STAGE_SETTINGS

    for stage, keys in STAGE_SETTINGS.items():
        with pytest.raises(SystemExit):
            main([stage, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for key in keys:
            section, name = key.split(".")
            obj = getattr(default_config, section)
            assert f"{key}={_shown(getattr(obj, name))}" in out, (stage, key)
            first_words = " ".join(obj.__dataclass_fields__[name].metadata["help"].split()[:6])
            assert first_words in out, (stage, key)


# --- no measured results in help, comments or docstrings ----------------------------------------------------------

RESULT = re.compile(r"""(?ix)
    (?<![\w.])(?:\+-|±|\+|-)\d*\.\d+                                   # a signed result: +0.003, -0.031, +-0.003
  | \d(?:\.\d+)?x\+?\s+(?:faster|slower|cheaper|quicker|longer|one\b)  # 1.7x slower, took 1.6x one order's
  | (?:faster|slower)\s*\(?~?\d(?:\.\d+)?x                           # slower (1.2x)
  | ~\d+(?:\.\d+)?x\b                                                 # ~3x
  | \bno\ better\b | \bnone\ better\b | \bdid\ not\ make\b | \bnothing\ measurable\b | \bmeasurably\b | \bmeasured\s+(?:at\s+|as\s+)?[+~-]?\d
  | \bscored\s+[+-]?\d | \d\s*vs\.?\s*[+-]?\d                         # scored 0.5, 0.474 vs 0.532
  | \[\s*[+-]?\d*\.\d+\s*,\s*[+-]?\d*\.\d+\s*\]                     # an interval [-0.01, +0.02]
  | \d\s*(?:->|→)\s*\d                                                 # 0.99 -> 0.54-0.73
  | \bused\ to\ (?:exit|crash|hang|fail|take|run|be)\b                # what an old version did
  | \d+(?:\.\d+)?%\s+(?:vs|better|worse|faster|slower|of\ its)        # -18% vs production
  | \bminutes?\ on\ both\b
""")
# (file relative to mmart/, the matched text) pairs that are not results; keep it short.
ALLOWED: set[tuple[str, str]] = set()


def prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment, docstring and help text (``help=``/``description=``/``epilog=`` arguments,
    ``metadata={"help": ...}`` and ``*_HELP`` constants) in a module's source."""
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]

    def strings(node: ast.AST) -> None:
        out.extend((c.lineno, c.value) for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in ("help", "description", "epilog"):
                    strings(kw.value)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "help":
                    strings(v)
        elif isinstance(node, ast.Assign) and any(isinstance(n, ast.Name) and n.id.endswith("_HELP") for n in node.targets):
            strings(node.value)
    return out


def test_the_result_finder_sees_results_in_comments_docstrings_and_helps() -> None:
    source = '''"""Cosine 0.99 -> 0.54-0.73 in a run."""
X_HELP = "fp32 is ~1.7x slower"
f = field(default=1, metadata={"help": "it did not make the model choose better (within +-0.003)"})
p.add_argument("--k", help="chose no better than numbers")  # lift [-0.01, +0.02]
def g():
    """A rank used to exit early."""
'''
    hits = [(line, m.group(0)) for line, text in prose(source) for m in RESULT.finditer(text)]
    assert {line for line, _ in hits} == {1, 2, 3, 4, 6}, hits
    plain = "n = 3  # three candidates, a 2x2 grid, 4x the slots; -1 pads; measure it with `mmart plan`\n"
    assert not [m.group(0) for _, text in prose(plain) for m in RESULT.finditer(text)]


def test_no_measured_results_in_mmart_help_comments_or_docstrings() -> None:
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = str(f.relative_to(PACKAGE))
        for line, text in prose(f.read_text()):
            for m in RESULT.finditer(text):
                if (rel, m.group(0)) not in ALLOWED:
                    found.append(f"mmart/{rel}:{line}: {m.group(0)!r} in {text.strip()[:120]!r}")
    assert not found, ("a measured result in a help, comment or docstring; say what the setting does and end with "
                       "'(evidence: docs/experiments.md)' instead:\n" + "\n".join(found))
