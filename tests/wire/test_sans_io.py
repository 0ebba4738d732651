"""wire/ is sans-IO: none of asyncio, socket, ssl, sqlite3 or time (style.md, "The sans-IO split").

Two checks:

* the source: no file in wire/ imports one of them (AST of every wire/*.py, including
  `from x import y`, relative-free `__import__` and `importlib.import_module` calls);
* the running import: in a fresh interpreter, importing every wire module pulls in none of
  them. Two dependencies import `time` themselves, and that is not wire's doing: construct
  2.10 (construct/lib/bitstream.py: `from time import sleep`, next to pdb, signal, inspect
  and friends) and the stdlib `logging`, which session.py uses for its state-change log
  (logging stamps records with time.time()). Neither imports asyncio, socket, ssl or sqlite3.
  So the subprocess blocks asyncio/socket/ssl/sqlite3 for everything, imports construct and
  logging, then removes `time` from sys.modules (the interpreter preloads it) and blocks it
  too while every wire module is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

WIRE = Path(__file__).resolve().parents[2] / "wire"
FORBIDDEN = {"asyncio", "socket", "ssl", "sqlite3", "time"}
WIRE_FILES = sorted(WIRE.glob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("__import__", "importlib.import_module", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value.split(".")[0])
                else:
                    found.add("<dynamic import>")
    return found


def test_every_module_is_checked() -> None:
    names = {p.stem for p in WIRE_FILES}
    assert {"session", "messages", "bulk", "ies", "frames", "events", "fuzz"} <= names


@pytest.mark.parametrize("path", WIRE_FILES, ids=lambda p: p.name)
def test_source_imports_nothing_forbidden(path: Path) -> None:
    found = _imports(ast.parse(path.read_text(), filename=str(path)))
    assert not found & FORBIDDEN, f"{path.name} imports {sorted(found & FORBIDDEN)}"
    assert "<dynamic import>" not in found


def test_the_ast_check_can_fail() -> None:
    for source in ("import time", "from socket import socket", "import asyncio.events",
                   "__import__('ssl')", "importlib.import_module('sqlite3')"):
        assert _imports(ast.parse(source)) & FORBIDDEN, source


_PROBE = r"""
import sys
BLOCKED = {"asyncio", "socket", "ssl", "sqlite3"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("sans-IO: blocked import of " + name)
        return None

sys.meta_path.insert(0, Blocker())
import construct  # imports time (and none of the others)
import logging  # imports time for record timestamps
assert "time" in sys.modules
del sys.modules["time"]
BLOCKED.add("time")
import wire, wire.constants, wire.errors, wire.ies, wire.messages, wire.frames
import wire.events, wire.session, wire.credential, wire.fuzz
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
assert "atheris" not in sys.modules  # the fuzz runner imports it only when it runs
print("clean")
"""


def test_importing_wire_pulls_in_nothing_forbidden() -> None:
    result = subprocess.run([sys.executable, "-I", "-c", _PROBE], cwd=WIRE.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_the_probe_can_fail() -> None:
    probe = _PROBE.replace("import wire, wire.constants", "import time, wire.constants")
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=WIRE.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "blocked import of time" in result.stderr
