"""The code's layout rules: ``shared/`` never imports ``services/``, and no module holds a whole subsystem."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 800


def _python_files(*folders: str) -> list[Path]:
    return [
        path
        for folder in folders
        for path in sorted((REPO / folder).rglob("*.py"))
        if "_generated" not in path.parts
    ]


def test_shared_never_imports_a_service() -> None:
    offenders = []
    for path in _python_files("shared"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            line = getattr(node, "lineno", 0)
            offenders += [
                f"{path.relative_to(REPO)}:{line} {n}" for n in names if n.startswith("wsitk.services")
            ]
    assert offenders == [], "shared/ is the services' library; it must not depend on them:\n" + "\n".join(
        offenders
    )


def test_no_module_is_over_800_lines() -> None:
    long = {
        str(path.relative_to(REPO)): count
        for path in _python_files("shared", "services", "tests")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these along their seams: {long}"
