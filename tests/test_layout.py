"""The layout rules of design.md section 2, read from the source (ast: nothing here imports the
packages), and no path of a developer's machine in a tracked file.

Imports count at any depth (inside functions too: a lazy import is still a dependency), and so do
``importlib.import_module("...")`` and ``__import__("...")`` with a literal name. Each failure names
the file, the line and the rule.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What quant/ really imports besides the standard library: design.md's numpy, torch, onnx and
# pydantic, plus safetensors (the QParams file), ml_dtypes (onnx's int4 arrays, quant/export.py)
# and transformers (the attention hook of quant/instrument.py).
QUANT_THIRD_PARTY = frozenset({"numpy", "torch", "onnx", "pydantic", "safetensors", "ml_dtypes", "transformers"})

FORBIDDEN = {
    "quant": frozenset({"flwr", "onnxruntime", "client", "server", "simulation", "ray", "cryptography", "sqlite3"}),
    "client": frozenset({"server", "simulation"}),
    "server": frozenset({"client", "simulation"}),
}

# Known departures from the table, one file each, with the reason. quant/release.py signs and
# verifies release bundles with Ed25519: the server signs, the device verifies, and what both sides
# use lives in quant/ (design.md section 2); its cryptography imports are inside the functions.
# quant/tflite.py writes the LiteRT form of the QDQ model as quant/qdq.py writes the ONNX one: the
# .tflite flatbuffer schema (ai_edge_litert) and the converter (litert_torch), imported inside its
# functions from the optional fedquant[litert] extra; the LiteRT interpreter lives in client/.
ALLOWED = {("quant/release.py", "cryptography"), ("quant/tflite.py", "ai_edge_litert"),
           ("quant/tflite.py", "litert_torch")}


def imports(source: str) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import in ``source``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value.split(".")[0]))
    return sorted(out)


def import_violations(package: str, rel: str, source: str) -> list[str]:
    """The rule breaks of one file of ``package`` (``rel``: its path from the repository root)."""
    bad = []
    for line, mod in imports(source):
        if (rel, mod) in ALLOWED:
            continue
        if mod in FORBIDDEN[package]:
            bad.append(f"{rel}:{line}: imports {mod} (rule: {package}/ imports none of "
                       f"{', '.join(sorted(FORBIDDEN[package]))}; design.md section 2)")
        elif package == "quant" and mod != "quant" and mod not in sys.stdlib_module_names \
                and mod not in QUANT_THIRD_PARTY:
            bad.append(f"{rel}:{line}: imports {mod} (rule: quant/ imports the standard library and "
                       f"{', '.join(sorted(QUANT_THIRD_PARTY))} only; design.md section 2)")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    files = sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)
    assert files, f"no Python files under {package}/"
    bad = []
    for path in files:
        bad += import_violations(package, path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8"))
    assert not bad, "\n".join(bad)


def test_import_rules_can_fail():
    """The checks see a lazy import inside a function, import_module, and the quant allow-list."""
    src = "import numpy\ndef f():\n    from flwr.app import Message\n    import importlib\n" \
          "    importlib.import_module('server.app')\n    import requests\n"
    assert [v.split(" (")[0] for v in import_violations("quant", "quant/x.py", src)] == [
        "quant/x.py:3: imports flwr", "quant/x.py:5: imports server", "quant/x.py:6: imports requests"]
    assert import_violations("client", "client/x.py", "def f():\n    import simulation.simulate\n")
    assert import_violations("server", "server/x.py", "from client import app\n")
    assert not import_violations("server", "server/x.py", "import sqlite3, flwr\nfrom quant import wire\n")
    assert import_violations("quant", "quant/wire.py", "from cryptography import x509\n")


# ------------------------------------------------------------------------------ machine paths

# /work/..., /root/..., /tmp/... and /home/<user>/... with a path component after them, not inside
# a longer path or URL (runs/work/x, https://host/tmp/x, $(VENV)/tmp/x do not count).
MACHINE_PATH = re.compile(r"(?<![\w.~$/)}-])(?:/(?:work|root|tmp)/|/home/[\w.-]+/)[\w.-]+")
SCANNED_SUFFIXES = frozenset({".py", ".md", ".toml", ".txt", ".json", ".cfg", ".ini", ".yaml", ".yml", ".sh"})
# This file holds the rule's own examples. (The benches' result files are scanned too: they record
# cache directories under the home directory as ~/..., bench.common.shown_path.)
NOT_SCANNED = ("tests/test_layout.py",)
# Scratch directories in commands shown to the reader: /tmp exists on every machine.
SCRATCH = {("Makefile", "/tmp/fedquant-lock"), ("README.md", "/tmp/s"), ("README.md", "/tmp/q"),
           ("bench/quality.py", "/tmp/q"), ("bench/litert.py", "/tmp/litert.json")}


def machine_paths(rel: str, text: str) -> list[str]:
    bad = []
    for no, line in enumerate(text.splitlines(), 1):
        for m in MACHINE_PATH.finditer(line):
            if (rel, m.group()) not in SCRATCH:
                bad.append(f"{rel}:{no}: {m.group()!r} (rule: no absolute path of a developer's machine "
                           f"in a tracked file; use a path relative to the repository)")
    return bad


def scanned(rel: str) -> bool:
    p = Path(rel)
    if any(p.match(g) for g in NOT_SCANNED):
        return False
    return p.suffix in SCANNED_SUFFIXES or p.name == "Makefile" or p.parts[0] == ".ci"


def tracked_files() -> list[str]:
    try:
        r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git ls-files: {e}")
    if r.returncode != 0:
        pytest.skip("not a git checkout: no tracked files to check")
    return [f for f in r.stdout.decode().split("\0") if f]


def test_no_machine_paths_in_tracked_files():
    bad = []
    for rel in tracked_files():
        path = ROOT / rel
        if scanned(rel) and path.is_file():
            bad += machine_paths(rel, path.read_text(encoding="utf-8", errors="replace"))
    assert not bad, "\n".join(bad)


def test_machine_path_rule_can_fail():
    hits = [m.group() for s in ('"""(/work/plan/protocol.md)', "cd /home/alice/src", "--out /tmp/run1",
                                "cache: /root/.cache/x", "https://example.org/tmp/x", "runs/work/x",
                                "$(VENV)/tmp/x", "/work/", "~/work/x")
            for m in MACHINE_PATH.finditer(s)]
    assert hits == ["/work/plan", "/home/alice/src", "/tmp/run1", "/root/.cache"]
    assert machine_paths("client/x.py", "x = '/tmp/s'\n") and not machine_paths("README.md", "--out /tmp/s\n")
    assert scanned("Makefile") and scanned(".ci/run") and scanned("docs/protocol.md")
    assert scanned("bench/results/client_jobs.json") and not scanned("bench/results/quality_bench.png")
