"""The import contract of docs/architecture.md, read from the source with ``ast``.

Layers, bottom up: config, core, providers, upstream, server, mock, then the CLI. A module may
import its own layer and the layers below it; the pure layers (config, core, providers) never
import aiohttp, prometheus_client or anything that does I/O on its own. No module imports
another in a circle, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "proxy"

# Each layer and the proxy layers it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "config": frozenset(),
    "core": frozenset({"config"}),
    "providers": frozenset({"config", "core"}),
    "upstream": frozenset({"config", "core"}),
    "server": frozenset({"config", "core", "providers", "upstream"}),
    "mock": frozenset({"config", "core", "providers", "upstream", "server"}),
    "cli": frozenset({"config", "core", "providers", "upstream", "server", "mock"}),
    "init": frozenset({"core"}),
}
# Third-party packages a pure layer must not import: the shell's web stack, metrics and I/O.
SHELL_ONLY = frozenset({"aiohttp", "prometheus_client", "multidict", "yarl", "uvloop", "httptools"})
# Layers that never touch files (config reads the rules file; core and providers take values).
NO_FILE_IO = frozenset({"core", "providers"})
# ``from os import environ`` reads the environment as surely as ``os.environ`` does.
ENVIRONMENT_NAMES = frozenset({"os.environ", "os.getenv", "os.environb", "os.getenvb"})
PURE_FORBIDDEN: dict[str, frozenset[str]] = {
    "config": SHELL_ONLY,
    "core": SHELL_ONLY | {"yaml", "subprocess", "socket", "ssl", "asyncio"},
    "providers": SHELL_ONLY | {"yaml", "subprocess", "socket", "ssl", "asyncio"},
}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    yield from _imports_in(name, path.read_text(), is_package=path.name == "__init__.py")


def _imports_in(name: str, source: str, *, is_package: bool = False) -> Iterator[tuple[str, int]]:
    """Every module ``source`` imports: import statements (inside functions too) and
    ``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name."""
    tree = ast.parse(source)
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from proxy.server import api` imports proxy.server.api
                yield f"{target}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "proxy":
        return "init"
    if parts[1] in {"cli", "__main__"}:
        return "cli"
    return parts[1]


MODULES = dict(_modules())


def _proxy_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in _imports(module, path):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """What in ``source`` (the text of ``module``) breaks the contract, one line each."""
    layer = _layer(module)
    allowed = ALLOWED[layer] | {layer}
    forbidden = PURE_FORBIDDEN.get(layer, frozenset())
    bad = []
    for target, line in _imports_in(module, source, is_package=is_package):
        top = target.split(".")[0]
        if top == "proxy" and target in MODULES and target != "proxy":
            if _layer(target) not in allowed:
                bad.append(f"line {line}: {target} (layer {_layer(target)})")
        elif top in forbidden:
            bad.append(f"line {line}: {target} (not in a pure layer)")
        elif layer in PURE_FORBIDDEN and target in ENVIRONMENT_NAMES:
            bad.append(f"line {line}: {target} (the process environment)")
    if layer in PURE_FORBIDDEN:
        bad += [
            f"line {node.lineno}: .{node.attr} (the process environment)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}
        ]
    if layer in NO_FILE_IO:
        bad += [
            f"line {node.lineno}: open() (file I/O)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and _called_name(node.func) in {"open", "read_text"}
        ]
    return bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_and_those_below(module: str) -> None:
    path = MODULES[module]
    bad = violations(module, path.read_text(), is_package=path.name == "__init__.py")
    assert not bad, f"{module} ({_layer(module)}): " + "; ".join(bad)


def test_no_import_cycle_in_the_package() -> None:
    edges = _proxy_edges()
    # Package __init__ modules that only re-export are still modules: a cycle through them counts.
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(edges[node]):
            if color[nxt] == grey:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif color[nxt] == white:
                visit(nxt, stack)
        stack.pop()
        color[node] = black

    for module in sorted(edges):
        if color[module] == white:
            visit(module, [])
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "source",
    [
        "from proxy.server.metrics import Metrics\n",
        "import aiohttp\n",
        "def f():\n    from prometheus_client import Counter\n",
        "import importlib\nweb = importlib.import_module('aiohttp.web')\n",
        "from os import environ\n",
        "from os import getenv as ge\n",
        "import os\nkey = os.environ['OPENAI_API_KEY']\n",
        "import socket\n",
        "with open('/etc/passwd') as f:\n    pass\n",
    ],
)
def test_the_checker_catches_each_kind_of_violation_in_a_pure_layer(source: str) -> None:
    assert violations("proxy.core.sample", source)


def test_the_checker_lets_the_shell_import_below_it() -> None:
    source = "import aiohttp\nimport os\nfrom proxy.core.breaker import State\nos.environ\n"
    assert violations("proxy.server.sample", source) == []


def test_the_package_root_is_the_breaker_library_and_loads_no_shell() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from proxy import CircuitBreaker, CircuitBreakerConfig, registry; "
        "b = registry.get_or_create('svc'); assert isinstance(b, CircuitBreaker); "
        "print(sorted(m for m in ('aiohttp', 'prometheus_client', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
