"""The walls between the package's rooms, read from the source: every import of every module in src/ (those
inside functions too), checked against the rules below. ``docs/architecture.md`` and the house style
(shared/docs/STYLE.md) say why each wall is there.

    data/     imports no models, moe or judges, nor torch / transformers / peft / accelerate
    judges/   import no moe and no fusion (they know nothing of the MoE)
    moe/      imports no config, runs or stage (a library: experts, fusion, the build stage, evaluate, ...)
    only cli.py parses arguments (argparse / typer / click); no library module imports cli
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

STAGES = ("h3fusion.config", "h3fusion.runs", "h3fusion.data", "h3fusion.experts", "h3fusion.build",
          "h3fusion.fusion", "h3fusion.generate", "h3fusion.evaluate", "h3fusion.report", "h3fusion.pipeline",
          "h3fusion.ablate", "h3fusion.systems", "h3fusion.judges", "h3fusion.baselines", "h3fusion.cli")
"""What the MoE library may not import: the run config and layout, and every stage of the pipeline."""
ARGUMENT_PARSERS = ("argparse", "typer", "click")
MODEL_LIBRARIES = ("torch", "transformers", "peft", "accelerate")

WALLS: list[tuple[str, tuple[str, ...], str]] = [  # (importing modules, imported modules, the wall)
    ("h3fusion.data", ("h3fusion.models", "h3fusion.moe", "h3fusion.judges", *MODEL_LIBRARIES),
     "data/ knows nothing of models or judges"),
    ("h3fusion.judges", ("h3fusion.moe", "h3fusion.fusion"), "judges/ know nothing of the MoE"),
    ("h3fusion.moe", STAGES, "moe/ is a library: no config, run layout or stage"),
    ("h3fusion", ARGUMENT_PARSERS, "only cli.py parses arguments"),
    ("h3fusion", ("h3fusion.cli",), "library modules never import cli.py"),
]
DOORS = ("h3fusion.cli", "h3fusion.__main__")
"""The command line itself: the one module that parses arguments, and ``python -m h3fusion``."""

PENDING: set[tuple[str, str]] = set()
"""(module, imported module) of crossings another branch is about to remove, each with a comment naming it; the
coordinator deletes an entry once that branch lands. Empty: every wall holds."""


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import in ``source``, at any depth; ``from a import b`` gives a.b too
    (b may be a module), relative imports resolved against ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def crossings(module: str, source: str, is_package: bool = False) -> list[str]:
    """The walls ``module`` (given its source) crosses, one line each."""
    if module in DOORS:
        return []
    out: dict[tuple[int, str], str] = {}  # one line per import statement and forbidden module
    for imported, line in imports(module, source, is_package):
        for importer, forbidden, wall in WALLS:
            if not _inside(module, importer):
                continue
            for target in forbidden:
                if _inside(imported, target) and not _inside(module, target) and (module, target) not in PENDING:
                    out.setdefault((line, target), f"{module}:{line} imports {imported} ({wall})")
    return [out[key] for key in sorted(out)]


def test_no_module_crosses_a_wall():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        found += crossings(module_name(path), path.read_text(), path.name == "__init__.py")
    assert found == []


def test_every_pending_crossing_still_exists():
    """An allow-list entry whose crossing is gone would let a new one in unseen: delete it when its branch lands."""
    seen = set()
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        for imported, _ in imports(module, path.read_text(), path.name == "__init__.py"):
            seen |= {(m, target) for m, target in PENDING if m == module and _inside(imported, target)}
    assert seen == PENDING


def test_the_checker_finds_a_crossing_inside_a_function():
    source = "import json\n\ndef load():\n    from h3fusion.moe.layer import MoEMLP\n    return MoEMLP\n"
    assert crossings("h3fusion.data.toy", source) == [
        "h3fusion.data.toy:4 imports h3fusion.moe.layer (data/ knows nothing of models or judges)"]
    assert crossings("h3fusion.judges.toy", "from ..fusion import fused_dir\n") == [
        "h3fusion.judges.toy:1 imports h3fusion.fusion (judges/ know nothing of the MoE)"]
    assert crossings("h3fusion.moe.toy", "from h3fusion import config\n") == [
        "h3fusion.moe.toy:1 imports h3fusion.config (moe/ is a library: no config, run layout or stage)"]
    assert crossings("h3fusion.report.toy", "import argparse\nfrom h3fusion.cli import app\n") == [
        "h3fusion.report.toy:1 imports argparse (only cli.py parses arguments)",
        "h3fusion.report.toy:2 imports h3fusion.cli (library modules never import cli.py)"]
    assert crossings("h3fusion.cli", "import typer\n") == []  # the door
    assert crossings("h3fusion.data.toy", "from h3fusion.data import prompts\nimport numpy\n") == []
