"""The package is the pipeline: every import points down the stages (README, "Layout").

Read from the source with ast, so a function-local import counts as much as one at the top.
Pure: no root, nothing run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "bindguard"
README = Path(__file__).resolve().parent.parent / "README.md"

# The stages, lowest first. A module may import its own stage and any stage before it, except
# verdict, which is pure and may import only model. bindguard itself (its __version__, the stop
# record) is below all.
STAGES = ("model", "systemd", "request", "evidence", "verdict", "action", "report", "cli")
ONLY = {"verdict": {"model", "verdict"}}
ORDER_LINE = " < ".join(STAGES)


def allowed(stage: str) -> set[str]:
    return ONLY.get(stage) or set(STAGES[:STAGES.index(stage) + 1])


def stage_of(module: str) -> str | None:
    """The stage of bindguard.STAGE.rest; None for bindguard itself."""
    parts = module.split(".")
    if parts[0] != "bindguard" or len(parts) == 1:
        return None
    return "cli" if parts[1] == "__main__" else parts[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("bindguard", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, bindguard module or name imported), for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "bindguard":  # from bindguard import x: x is the module imported
                found += [(node.lineno, f"bindguard.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "bindguard" or name.startswith("bindguard.")]


def test_every_module_lives_in_a_stage():
    strays = [m for m in modules() if m not in ("bindguard", "bindguard.__main__") and stage_of(m) not in STAGES]
    assert not strays, f"modules outside the stages {STAGES}: {strays}"


def test_every_import_points_down_the_stages():
    upward = []
    for module, path in modules().items():
        stage = stage_of(module)
        for line, name in imported(module, path):
            target = stage_of(name)
            if target is None or target not in STAGES:
                continue  # a name of bindguard itself (every module lives in a stage): below all
            if stage is None or target not in allowed(stage):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({stage}) imports {name}")
    assert not upward, "imports that point up the stages (" + ORDER_LINE + "):\n" + "\n".join(upward)


def test_bindguard_itself_imports_nothing():
    assert imported("bindguard", PACKAGE / "__init__.py") == []


def test_every_stage_says_what_it_may_import():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"bindguard/{stage}/__init__.py: no docstring saying what it may import"


def test_the_readme_states_the_same_order():
    assert ORDER_LINE in README.read_text(), f"README's Layout must state the stages as: {ORDER_LINE}"


def test_the_readme_module_table_has_one_row_for_each_stage():
    """A Markdown table ends at the first line that is not a row: a row broken over two lines hides
    every row after it."""
    lines = README.read_text().splitlines()
    start = lines.index("| where | what |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    named = {stage for stage in STAGES for first in rows if f"{stage}/`" in first}
    assert named == set(STAGES), f"README's module table, one row a line, has no row for {set(STAGES) - named}"
