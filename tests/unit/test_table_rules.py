"""The table rules (``shared/db/tables.py``, docs/design.md "Tables and who may use them"), checked on the code.

Without a database: every string constant in ``shared/`` and ``services/`` (f-strings included, docstrings
left out) is searched for the tables a statement names after ``FROM``, ``JOIN``, ``INTO``, ``UPDATE`` and
``DELETE FROM`` (upper-case keywords, as the project writes SQL), and each module's tables are compared
with what ``SQL_MODULES`` allows it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from wsitk.shared.db.tables import SQL_MODULES, TABLE_GROUPS, VIEWER_READS, Access

REPO = Path(__file__).resolve().parents[2]
# a name after one of the keywords; a name directly followed by "(" is a function (now(), count(*))
_REFERENCE = re.compile(r"\b(DELETE\s+FROM|FROM|JOIN|INTO|UPDATE)\s+([A-Za-z_][\w.]*)(\()?")
_CTE = re.compile(r"(?:\bWITH|,)\s+([A-Za-z_]\w*)\s+AS\s*\(")
_KEYWORDS = {"SET", "LATERAL", "ONLY"}  # ON CONFLICT ... DO UPDATE SET, JOIN LATERAL (...), FROM ONLY t
_CREATED = re.compile(
    r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:wsi\.)?([a-z_]\w*)"
)


@dataclass(frozen=True)
class Statement:
    line: int
    reads: frozenset[str]
    writes: frozenset[str]


def table_references(text: str) -> tuple[set[str], set[str]]:
    """``(read, written)`` table names one SQL string mentions (``wsi.`` dropped, catalogues left out)."""
    ctes = set(_CTE.findall(text))
    reads: set[str] = set()
    writes: set[str] = set()
    for keyword, name, call in _REFERENCE.findall(text):
        table = name.removeprefix("wsi.")
        if (
            call
            or name.upper() in _KEYWORDS
            or table in ctes
            or table.startswith(("pg_", "information_schema"))
        ):
            continue
        (writes if keyword in ("INTO", "UPDATE") or keyword.startswith("DELETE") else reads).add(table)
    return reads, writes


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def statements(source: str) -> list[Statement]:
    """The SQL strings of a module that name at least one table."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # its parts are read as one string below
            skip.update(id(part) for part in node.values)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                str(part.value) if isinstance(part, ast.Constant) else "{}" for part in node.values
            )
        else:
            continue
        reads, writes = table_references(text)
        if reads or writes:
            found.append(Statement(node.lineno, frozenset(reads), frozenset(writes)))
    return found


def violations(module: str, source: str, rules: dict[str, Access]) -> list[str]:
    """What the module's SQL does that ``rules`` does not allow it (``module``: path from the root)."""
    known = frozenset().union(*TABLE_GROUPS.values())
    allowed = rules.get(module)
    problems = []
    for statement in statements(source):
        where = f"{module}:{statement.line}"
        unknown = (statement.reads | statement.writes) - known
        if unknown:
            problems.append(f"{where} names tables no group of shared/db/tables.py has: {sorted(unknown)}")
        if allowed is None:
            problems.append(f"{where} holds SQL but shared/db/tables.py lists no tables for this module")
            continue
        if statement.writes - allowed.writes:
            problems.append(f"{where} writes {sorted(statement.writes - allowed.writes)}, not its tables")
        if statement.reads - allowed.reads - allowed.writes:
            problems.append(f"{where} reads {sorted(statement.reads - allowed.reads - allowed.writes)}")
    return problems


def _modules() -> list[Path]:
    return [
        path
        for folder in ("shared", "services")
        for path in sorted((REPO / folder).rglob("*.py"))
        if "_generated" not in path.parts
    ]


def test_the_extractor_reads_statements_as_meant() -> None:
    assert table_references(
        "INSERT INTO upload_groups (bucket, group_key) VALUES (%s, %s) "
        "ON CONFLICT (bucket, group_key) DO UPDATE SET last_part_at = now()"
    ) == (set(), {"upload_groups"})
    assert table_references(
        "SELECT extract(epoch FROM now() - s.first_seen_at) FROM slides s "
        "LEFT JOIN LATERAL (SELECT 1 FROM wsi.predictions p) q ON true JOIN pg_roles r ON true"
    ) == ({"slides", "predictions"}, set())
    assert table_references("DELETE FROM delivery_attempts WHERE topic = %s") == (
        set(),
        {"delivery_attempts"},
    )
    assert table_references("WITH due AS (SELECT 1 FROM upload_groups) SELECT * FROM due") == (
        {"upload_groups"},
        set(),
    )
    assert table_references("moved from here") == (set(), set())


def test_every_statement_keeps_to_its_modules_tables() -> None:
    problems = []
    for path in _modules():
        problems += violations(str(path.relative_to(REPO)), path.read_text(), SQL_MODULES)
    assert problems == [], "SQL outside its module's tables (shared/db/tables.py):\n" + "\n".join(problems)


def test_a_statement_that_breaks_the_rules_is_reported() -> None:
    snippet = '''
def sneak(db):
    """Reads FROM docstrings are not statements."""
    db.execute("SELECT plan FROM scorer_plans WHERE slide_id = %s", ("s",))
    db.execute(f"UPDATE slides SET status = {'x'!r}")
'''
    # the tiler has no tables at all
    assert len(violations("services/tiler/handler.py", snippet, SQL_MODULES)) == 2
    # the scorer's module may read scorer_plans but must not write the recorder's slides
    problems = violations("shared/db/scores.py", snippet, SQL_MODULES)
    assert problems == ["shared/db/scores.py:5 writes ['slides'], not its tables"]
    # ingest's module reads slides but must not read the scorer's state
    assert violations("shared/db/intake.py", snippet, SQL_MODULES)[0].endswith("reads ['scorer_plans']")
    unknown = violations("shared/db/records.py", 'Q = "SELECT 1 FROM slide_notes"', SQL_MODULES)
    assert unknown and "slide_notes" in unknown[0]


def test_every_table_the_migrations_create_has_one_group() -> None:
    created = set()
    for path in [*sorted((REPO / "shared/db/migrations").glob("*.sql")), REPO / "shared/db/migrate.py"]:
        created |= set(_CREATED.findall(path.read_text()))
    groups = list(TABLE_GROUPS.values())
    assert frozenset().union(*groups) == created
    assert sum(len(g) for g in groups) == len(created), "a table sits in two groups"
    assert set(SQL_MODULES) <= {str(p.relative_to(REPO)) for p in _modules()}, (
        "a rule for a module that is gone"
    )


def test_the_viewer_reads_what_its_role_is_granted() -> None:
    text = (REPO / "shared/db/migrations/0004_viewer_read_only.sql").read_text()
    granted = {
        name.strip()
        for grant in re.findall(r"GRANT SELECT ON (.+?) TO wsi_readonly", text, re.S)
        for name in grant.split(",")
    }
    assert granted == VIEWER_READS


def documented_modules(design_note: str) -> dict[frozenset[str], set[str]]:
    """docs/design.md's table: each row's tables -> the modules its last column names."""
    section = design_note.split("### Tables and who may use them", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        tables_cell, _written, _read, where_cell = [c.strip() for c in row.strip("|").split("|")]
        tables = frozenset(re.findall(r"`(\w+)`", tables_cell))
        documented[tables] = set(re.findall(r"`([\w/]+\.py)(?::[^`]*)?`", where_cell))
    return documented


def doc_disagreements(design_note: str, rules: dict[str, Access]) -> list[str]:
    documented = documented_modules(design_note)
    if set(documented) != set(TABLE_GROUPS.values()):
        return ["docs/design.md groups the tables otherwise than shared/db/tables.py"]
    problems = []
    for tables, modules in documented.items():
        expected = {m for m, a in rules.items() if (a.reads | a.writes) & tables}
        if modules != expected:
            problems.append(
                f"docs/design.md, {sorted(tables)}: names {sorted(modules)}, not {sorted(expected)}"
            )
    return problems


def test_the_design_notes_table_names_the_same_groups_and_modules() -> None:
    text = (REPO / "docs/design.md").read_text()
    assert doc_disagreements(text, SQL_MODULES) == []
    # the check sees a row that names another module, and a table left out of its group
    moved = text.replace("| `shared/db/intake.py` |", "| `services/ingest/poller.py` |")
    assert moved != text and len(doc_disagreements(moved, SQL_MODULES)) == 1
    dropped = text.replace("`scorer_plans`, `scorer_shards` |", "`scorer_plans` |")
    assert dropped != text and doc_disagreements(dropped, SQL_MODULES) != []
