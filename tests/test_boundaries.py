"""Boundaries the code keeps, checked on its source (issue 20), so they stay true:

* one module writes a connection's status: ``zapbus/connection/writer.py`` holds the only
  ``UPDATE connections ... SET ... status =``;
* no SQL string spells a state name: subsets come from ``zapbus/connection/states.py``
  (``values(...)`` as a bind parameter, ``sql_list(...)`` where a partial index must match);
* services never import each other: a module under ``services/X/`` imports no ``services.Y``
  (``services/baileys_sim`` is a separate program, imported by tests and benchmarks only);
  ``zapbus/`` and ``proto/`` import no ``services.*`` (what two services share lives below
  them; a command a service owns runs as its own process, ``zapbus/oneshot.py``);
* the operator's and developer's tools (``zapbus/tools/``) are imported by nothing else of
  the source tree: the services and the runtime library run without them;
* names say one thing: no class name is defined twice (one ``Lease``: ``zapbus/leases.py``;
  the projector's is ``PartitionLease``), no class is a bare ``Policy``, ``Pool`` or
  ``Manager`` (``DeliveryPolicy``, ``ReconcilePolicy``, ``PlacementPolicy``; ``ServerPool``
  and ``ServerPoolManager``, apart from the asyncpg pool), and no module is a bare
  ``pool.py`` or ``zapbus/webhooks.py`` (outbound endpoints are ``zapbus/endpoints.py``,
  inbound webhooks ``services/webhook/``).

Each check reads every string literal of the source tree (adjacent literals joined as Python
joins them, an f-string's holes as ``{}``), so SQL split over lines is read whole.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from zapbus.connection.states import Status

ROOT = Path(__file__).resolve().parent.parent
# the code that runs in production (bench/ and tests/ seed rows of their own)
SOURCES = ("services", "zapbus", "proto")
# the simulated Baileys server has states of its own, which are not zapbus's
OUTSIDE = ("services/baileys_sim/",)
WRITER = "zapbus/connection/writer.py"
TOOLS = "zapbus/tools/"

# UPDATE connections [AS c] SET <assignments> [FROM | WHERE | RETURNING ...]: the SET list only
_UPDATE = re.compile(
    r"\bUPDATE\s+connections\b(?:\s+(?:AS\s+)?(?!SET\b)\w+)?\s+SET\b(?P<sets>.*?)"
    r"(?:\bFROM\b|\bWHERE\b|\bRETURNING\b|$)",
    re.IGNORECASE | re.DOTALL,
)
_SETS_STATUS = re.compile(r"(?:^|,)\s*(?:\w+\.)?status\s*=", re.IGNORECASE)
_SQL = re.compile(r"\b(SELECT|UPDATE|INSERT\s+INTO|DELETE\s+FROM|WHERE)\b", re.IGNORECASE)
# the tables whose status columns hold connection states
_CONNECTION_TABLES = re.compile(r"\b(connections|connection_events)\b", re.IGNORECASE)
_NAMES = "|".join(s.value for s in Status)
_STATE_NAME = re.compile(f"'({_NAMES})'")
_STATE_LIST = re.compile(f"'(?:{_NAMES})'\\s*,\\s*'(?:{_NAMES})'")
_STATES = frozenset(s.value for s in Status)


def _text(node: ast.expr) -> str | None:
    """The string a literal expression makes (f-string holes as ``{}``), else None."""
    match node:
        case ast.Constant(value=str(value)):
            return value
        case ast.JoinedStr(values=parts):
            return "".join(
                p.value if isinstance(p, ast.Constant) and isinstance(p.value, str) else "{}"
                for p in parts
            )
        case ast.BinOp(left=left, op=ast.Add(), right=right):
            a, b = _text(left), _text(right)
            return a + b if a is not None and b is not None else None
    return None


def _strings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Each outermost string literal of a module, with its line."""
    inner: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in inner or not isinstance(node, ast.expr):
            continue
        text = _text(node)
        if text is None:
            continue
        inner.update(id(n) for n in ast.walk(node) if n is not node)
        yield node.lineno, text


def _modules(root: Path) -> Iterator[tuple[str, ast.AST]]:
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(OUTSIDE):
                yield rel, ast.parse(path.read_text(), rel)


def status_writers(root: Path = ROOT) -> dict[str, list[int]]:
    """Module -> lines of SQL that set ``connections.status``."""
    found: dict[str, list[int]] = {}
    for rel, tree in _modules(root):
        for line, text in _strings(tree):
            if any(_SETS_STATUS.search(m["sets"]) for m in _UPDATE.finditer(text)):
                found.setdefault(rel, []).append(line)
    return found


def spelled_states(root: Path = ROOT) -> list[str]:
    """``module:line: 'state'`` for each state name in an SQL string on the connection
    tables or in an SQL list of states, and ``module:line: (names)`` for each tuple, list or
    set literal of two or more state names."""
    found = []
    for rel, tree in _modules(root):
        for line, text in _strings(tree):
            sql = _SQL.search(text) and _CONNECTION_TABLES.search(text)
            if sql or _STATE_LIST.search(text):
                found += [f"{rel}:{line}: '{m}'" for m in _STATE_NAME.findall(text)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) > 1:
                names = [_text(e) for e in node.elts]
                if all(n in _STATES for n in names):
                    found.append(f"{rel}:{node.lineno}: ({', '.join(map(str, names))})")
    return found


def test_only_the_writer_sets_a_connections_status() -> None:
    assert status_writers() == {WRITER: status_writers()[WRITER]}


def test_no_sql_string_spells_a_state_name() -> None:
    assert spelled_states() == []


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The scanner itself: it finds the shapes the old code had, and skips look-alikes."""
    (tmp_path / "zapbus").mkdir()
    (tmp_path / "zapbus" / "a.py").write_text(
        "X = ('UPDATE connections SET generation = $2,'\n"
        "     \" status = 'pending', qr = NULL WHERE id = $1\")\n"
        "Y = f\"UPDATE connections AS c SET status = u.status FROM {'t'} WHERE c.id = u.id\"\n"
        "Z = 'SELECT id FROM connections WHERE status IN (' + \"'pending', 'creating')\"\n"
    )
    (tmp_path / "zapbus" / "b.py").write_text(
        "A = 'UPDATE connections SET status_reason = $2 WHERE status = $3'\n"
        "B = 'UPDATE baileys_servers SET status = 1 WHERE name = $1'\n"
        "C = \"UPDATE webhook_deliveries SET state = 'pending' WHERE id = $1\"\n"
        "D = 'failed'\n"
        "E = (\"('deleted', 'failed')\", ('qr_ready', 'pairing'), ('failed', 'stopped'))\n"
    )
    assert status_writers(tmp_path) == {"zapbus/a.py": [1, 3]}
    assert spelled_states(tmp_path) == [
        "zapbus/a.py:1: 'pending'",
        "zapbus/a.py:4: 'pending'",
        "zapbus/a.py:4: 'creating'",
        "zapbus/b.py:5: 'deleted'",
        "zapbus/b.py:5: 'failed'",
        "zapbus/b.py:5: (qr_ready, pairing)",
    ]


def _imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Each module a module imports (at any depth: late imports count), with its line:
    ``import a.b``, ``from a import b`` (as ``a.b`` too: ``b`` may be a module), and a
    literal ``importlib.import_module("a.b")`` (an f-string's text before its first hole)."""
    for node in ast.walk(tree):
        match node:
            case ast.Import(names=aliases):
                yield from ((node.lineno, a.name) for a in aliases)
            case ast.ImportFrom(module=str(module), level=0, names=aliases):
                yield node.lineno, module
                yield from ((node.lineno, f"{module}.{a.name}") for a in aliases)
            case ast.Call(func=ast.Attribute(attr="import_module") | ast.Name(id="__import__")):
                text = _text(node.args[0]) if node.args else None
                if text is not None:
                    yield node.lineno, text.split("{}")[0].rstrip(".")


def _owner(rel: str) -> str:
    """The package a source file belongs to: ``services.X`` for a service, else its top."""
    parts = rel.split("/")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 2 else parts[0]


def crossed_boundaries(root: Path = ROOT) -> list[str]:
    """``module:line: imported`` for each import across a boundary: a service's module
    importing another service, ``zapbus``/``proto`` importing any, or anything outside
    ``zapbus/tools/`` importing the tools."""
    found = []
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            owner = _owner(rel)
            for line, name in _imported(ast.parse(path.read_text(), rel)):
                parts = name.split(".")
                if parts[0] == "services" and len(parts) > 1 and ".".join(parts[:2]) != owner:
                    found.append(f"{rel}:{line}: {name}")
                if parts[:2] == ["zapbus", "tools"] and not rel.startswith(TOOLS):
                    found.append(f"{rel}:{line}: {name}")
    return sorted(set(found))


def test_no_service_imports_another_the_library_none_and_no_one_the_tools() -> None:
    assert crossed_boundaries() == []


def test_the_import_check_sees_every_way_in(tmp_path: Path) -> None:
    """The import scanner: plain, from, late (in a function) and importlib imports of another
    service are found, and of the tools from outside them; a service importing itself,
    ``zapbus`` or ``proto``, and the tools importing each other, are not."""
    files = {
        "services/a/app.py": (
            "from services.a.store import x\n"  # its own
            "from zapbus import bus\n"
            "import proto.names\n"
            "from services.b.relay import Relay\n"  # 4
            "def f():\n"
            "    import services.baileys_sim.app\n"  # 6
            "    from services import b\n"  # 7
        ),
        "services/b/app.py": (
            "import importlib\n"
            "importlib.import_module(f'services.a.{1}')\n"  # 2
            "importlib.import_module('services.b.x')\n"
        ),
        "zapbus/tool.py": "def g():\n    from services.a.app import main\n",  # 2
        "zapbus/httpkit.py": "from zapbus.tools import procs\n",  # 1
        "zapbus/tools/cli.py": "from zapbus.tools.procs import run\nimport zapbus.httpkit\n",
        "proto/m.py": '"services.a is only named here"\nimport zapbus.config\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert crossed_boundaries(tmp_path) == [
        "services/a/app.py:4: services.b.relay",
        "services/a/app.py:4: services.b.relay.Relay",
        "services/a/app.py:6: services.baileys_sim.app",
        "services/a/app.py:7: services.b",
        "services/b/app.py:2: services.a",
        "zapbus/httpkit.py:1: zapbus.tools",
        "zapbus/httpkit.py:1: zapbus.tools.procs",
        "zapbus/tool.py:2: services.a.app",
        "zapbus/tool.py:2: services.a.app.main",
    ]


# names that say nothing of what they name, as a class or as a module
_VAGUE_CLASSES = frozenset({"Policy", "Pool", "Manager"})
_VAGUE_MODULES = frozenset({"pool.py", "zapbus/webhooks.py"})


def vague_names(root: Path = ROOT) -> list[str]:
    """``module:line: class Name`` for each class named twice or vaguely, and ``module`` for
    each module with a vague name."""
    classes: dict[str, list[str]] = {}
    found = []
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if {rel, path.name} & _VAGUE_MODULES:
                found.append(rel)
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, []).append(f"{rel}:{node.lineno}")
    for name, where in sorted(classes.items()):
        if len(where) > 1 or name in _VAGUE_CLASSES:
            found += [f"{w}: class {name}" for w in where]
    return found


def test_names_say_one_thing() -> None:
    assert vague_names() == []


def test_the_name_check_sees_twins_and_vague_names(tmp_path: Path) -> None:
    files = {
        "zapbus/leases.py": "class Lease:\n    pass\n",
        "services/a/partitions.py": "class Lease:\n    pass\nclass PartitionLease:\n    pass\n",
        "services/b/placement.py": "class Policy:\n    pass\nclass PlacementPolicy:\n    pass\n",
        "services/b/pool.py": "class ServerPool:\n    pass\n",
        "services/b/server_pool.py": "",
        "zapbus/webhooks.py": "",
        "zapbus/endpoints.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert vague_names(tmp_path) == [
        "services/b/pool.py",
        "zapbus/webhooks.py",
        "services/a/partitions.py:1: class Lease",
        "zapbus/leases.py:1: class Lease",
        "services/b/placement.py:1: class Policy",
    ]
