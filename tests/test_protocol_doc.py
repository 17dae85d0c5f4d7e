"""docs/protocol.md lists the codes the code uses: the client's error codes, the simulation-only
ones the server accepts too, and the server's rejection codes."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"


def table_codes(heading: str) -> list[str]:
    """The backquoted first cells of the table under ``### heading`` (up to the next heading)."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^#|\Z)", text, re.M | re.S)
    assert m, f"{DOC.name}: no section '### {heading}'"
    codes = re.findall(r"^\| `([^`]+)` \|", m.group(1), re.M)
    assert codes, f"{DOC.name}: no codes in the table of '### {heading}'"
    assert len(codes) == len(set(codes)), f"{DOC.name}: a code listed twice under '### {heading}'"
    return codes


def server_client_codes() -> frozenset:
    """The error codes the server accepts from a client (moving out of server/app.py)."""
    for name in ("server.messages", "server.strategy", "server.app"):
        try:
            return frozenset(importlib.import_module(name).CLIENT_CODES)
        except (ImportError, AttributeError):
            continue
    raise AssertionError("CLIENT_CODES is in none of server.messages, server.strategy, server.app")


def test_client_codes_are_the_code_s():
    from client.app import ERROR_CODES

    client, simulation = table_codes("Client error codes"), table_codes("Simulation-only codes")
    assert set(client) == set(ERROR_CODES), (
        f"docs/protocol.md lists {sorted(client)}, client.app.ERROR_CODES is {sorted(ERROR_CODES)}")
    assert not set(client) & set(simulation)
    assert set(client) | set(simulation) == server_client_codes(), (
        f"docs/protocol.md lists {sorted(set(client) | set(simulation))}, the server's CLIENT_CODES "
        f"is {sorted(server_client_codes())}")


def _literal_codes(path: Path) -> set[str]:
    """First arguments of ``WireError("...")`` and ``Rejection("...")`` calls written as literals."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            if (f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")) in ("WireError", "Rejection"):
                out.add(node.args[0].value)
    return out


def test_rejection_codes_are_the_code_s():
    """Every code the wire format and the server's checks can give is listed, and nothing else
    (``client:<code>`` and ``client:other`` are made from a client's error reply)."""
    files = [ROOT / "quant" / "wire.py"] + sorted(p for p in (ROOT / "server").rglob("*.py")
                                                  if "__pycache__" not in p.parts)
    used = set().union(*(_literal_codes(p) for p in files))
    listed = set(table_codes("Server-side rejection codes")) - {"client:<code>", "client:other"}
    assert listed == used, (f"only in docs/protocol.md: {sorted(listed - used)}; "
                            f"only in the code: {sorted(used - listed)}")
