"""The command line's package: every module imports on its own (no import cycle), a short
command does not pay for the NBD server, and the names others import stay reachable."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

import blockpull

from relhelp import child_env

CLI_MODULES = ["common", "output", "create", "info", "map", "pull", "check", "demo",
               "vmdemo", "serve", "main"]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(), timeout=60)


@pytest.mark.parametrize("name", CLI_MODULES + ["nbd.connection", "nbd.server"])
def test_module_imports_first_in_a_fresh_interpreter(name):
    """Imported first, each module loads on its own."""
    mod = f"blockpull.cli.{name}" if not name.startswith("nbd.") else f"blockpull.{name}"
    r = run_python(f"import {mod}")
    assert r.returncode == 0, r.stderr


def test_the_command_line_does_not_import_the_server():
    """Serving (asyncio, ssl) and QMP are imported when a command needs them, not by
    every run of the command line."""
    r = run_python("import sys, blockpull.cli.main\n"
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                   "('asyncio', 'ssl') or m.startswith(('blockpull.nbd', 'blockpull.qmp'))))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_command_module_registers_its_subcommand():
    from blockpull.cli import build_parser, main as entry
    from blockpull.cli.main import COMMANDS
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == ["create", "info", "map", "pull", "check", "demo", "serve"]
    commands = {m.__name__.rsplit(".", 1)[1] for m in COMMANDS} - {"vmdemo"}
    assert commands == set(sub.choices)
    assert "--serve" in sub.choices["demo"].format_help()
    assert callable(entry)          # the console script's blockpull.cli:main


def test_server_limits_are_the_connections():
    from blockpull.nbd import connection, server
    for name in ("MAX_IN_FLIGHT", "MAX_BYTES_IN_FLIGHT", "MAX_OPTION"):
        assert getattr(server, name) == getattr(connection, name)
    assert set(server.__all__) >= {"Server", "serve", "MAX_CONNECTIONS"}


def _imports(package: str) -> Dict[str, Set[str]]:
    """For each module of ``package`` (blockpull.cli, blockpull.nbd), the modules of the
    same package it imports anywhere in its code (at import time or in a function)."""
    root = os.path.join(os.path.dirname(blockpull.__file__), *package.split(".")[1:])
    mods = {f"{package}.{f[:-3]}": os.path.join(root, f)
            for f in os.listdir(root) if f.endswith(".py") and f != "__init__.py"}
    graph: Dict[str, Set[str]] = {}
    for mod, path in mods.items():
        edges = graph.setdefault(mod, set())
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges.update(n for n in names if n in mods and n != mod)
    return graph


@pytest.mark.parametrize("package", ["blockpull.cli", "blockpull.nbd"])
def test_no_import_cycle(package):
    graph = _imports(package)
    assert len(graph) >= 4, graph
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2
    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
