"""Are two run directories the same result? ``python -m bench.compare_runs RUN_A RUN_B``

What a refactoring must not change, compared file by file: ``summary.json`` and ``metrics.jsonl``
without their timing and machine fields (``wall_s``, ``prepare_s``, ``machine``), and the
checkpoint, references, scales, starting and final QParams and exported models. A safetensors file
is compared by its tensors and its header's content: safetensors writes the header's metadata in an
order that varies from process to process, so two saves of the same QParams differ in bytes.
Prints one line per part and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

TIMING = frozenset({"wall_s", "prepare_s", "machine"})
FILES = ("checkpoint.safetensors", "references.json", "scales.jsonl", "initial", "qparams", "export")


def without_timing(x):
    if isinstance(x, dict):
        return {k: without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [without_timing(v) for v in x]
    return x


def content_digest(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".safetensors" and len(raw) >= 8:
        n = int.from_bytes(raw[:8], "little")
        try:
            header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
        except ValueError:
            header = raw[8:8 + n]
        raw = header + raw[8 + n:]
    return hashlib.sha256(raw).hexdigest()


def files_under(root: Path, part: str) -> dict[str, Path]:
    p = root / part
    found = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return {f.relative_to(root).as_posix(): f for f in found}


def compare(a: Path, b: Path) -> list[tuple[str, bool, str]]:
    """``(part, same, detail)`` for each part of the two runs."""
    out = []
    sa, sb = (without_timing(json.loads((r / "summary.json").read_text())) for r in (a, b))
    out.append(("summary.json without timing", sa == sb, ""))
    ma, mb = ([without_timing(json.loads(x)) for x in (r / "metrics.jsonl").read_text().splitlines() if x.strip()]
              for r in (a, b))
    out.append(("metrics.jsonl without wall_s", ma == mb, f"{len(ma)} and {len(mb)} rounds"))
    out.append(("metrics.jsonl key order", [list(x) for x in ma] == [list(x) for x in mb], ""))
    for part in FILES:
        fa, fb = files_under(a, part), files_under(b, part)
        differ = sorted(set(fa) ^ set(fb)) + sorted(k for k in set(fa) & set(fb)
                                                     if content_digest(fa[k]) != content_digest(fb[k]))
        out.append((part, not differ, f"{len(fa)} files" + (f"; differ: {differ[:5]}" if differ else "")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    rows = compare(args.a, args.b)
    for part, same, detail in rows:
        print(f"{'same' if same else 'DIFFERENT':<9} {part}" + (f" ({detail})" if detail else ""))
    return 0 if all(same for _, same, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
