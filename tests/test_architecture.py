"""The module map of docs/architecture.md, checked: layers import downward only,
only the endpoint calls h11's ``Connection``, and functions stay short.

These read the package's source with ``ast``; they fail when a change breaks
the map, so the map in the docs cannot drift from the code silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trioproxy"

# Each module's layer (docs/architecture.md); a module may import only from
# modules of a lower number.
LAYERS = {
    "_errors": 0,
    "_scratch": 0,
    "_budget": 0,
    "_listen": 0,
    "_limits": 0,
    "_framing": 1,
    "_policy": 1,
    "_config": 2,
    "_http": 3,
    "_relay": 4,
    "_endpoint": 4,
    "_splice": 5,
    "_watchdog": 5,
    "_pool": 5,
    "_metrics": 5,
    "_body": 6,
    "_tunnel": 6,
    "_upstream": 7,
    "_units": 0,
    "_tls": 5,
    "_tls_legs": 6,
    "_version": 0,
    "_origin": 9,
    "_routes": 0,
    "_proxy_protocol": 1,
    "_parent": 1,
    "_balance": 1,
    "_switching": 7,
    "_accesslog": 7,
    "_exchange": 8,
    "_shutdown": 8,
    "_timeouts": 9,
    "_connection": 10,
    "_memory": 10,
    "_workers": 10,
    "_server": 11,
    "_cli": 12,
    "_configfile": 3,
    "_front": 3,
    "_health": 8,
    "_reload": 9,
    "_configdoc": 3,
}
# The longest function body allowed in the package, docstring aside (issue #10).
MAX_FUNCTION_LINES = 60


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("_*.py") if p.stem not in ("__init__", "__main__"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_every_module_has_a_layer() -> None:
    """A new module must be placed on the map (and in docs/architecture.md)."""
    assert {path.stem for path in modules()} == set(LAYERS)


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_imports_go_downward_only(path: Path) -> None:
    """``from ._x import ...`` only from a lower layer: no cycles, no reaching up."""
    layer = LAYERS[path.stem]
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            assert LAYERS[node.module] < layer, f"{path.stem} imports {node.module}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_only_the_endpoint_calls_h11_connection(path: Path) -> None:
    """No module but ``_endpoint`` names ``h11.Connection`` or an endpoint's
    h11 state (``_conn``, ``conn``); the rest speak the endpoint's words."""
    if path.stem == "_endpoint":
        return
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("Connection", "_conn", "conn"), (
                f"{path.stem}:{node.lineno} uses .{node.attr}"
            )


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_functions_are_short(path: Path) -> None:
    """No function body over MAX_FUNCTION_LINES lines, its docstring aside."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            if body:
                length = (body[-1].end_lineno or 0) - body[0].lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.stem}.{node.name}: {length} lines"
