"""The simulated fleet: who the clients are, what text each holds, which device profile each runs.

Clients come from Shakespeare (one per (play, role), as LEAF does: naturally non-IID), from a
folder with one UTF-8 text file per client, or from a JSONL file of ``{"client": ..., "text": ...}``.
Each client's text is split into a training part and a held-out part; whole roles (or files) that
no client holds are kept for the server's evaluation. Token ids, never text, go to the device
directory (design.md section 11: nothing downloads; nothing but the client touches its data).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulation.config import DataConfig


@dataclass
class ClientData:
    pid: int                 # Flower's partition id: the node's index in the fleet
    client_id: str           # stable name ("hamlet/HAM", a file stem)
    profile: str
    train: np.ndarray        # int64 [N, T]
    test: np.ndarray         # int64 [M, T]


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _texts_by_client(source: str) -> dict[str, list[str]]:
    """client id -> texts, from a folder of .txt files or a JSONL file (clear errors on bad lines)."""
    p = Path(source)
    out: dict[str, list[str]] = {}
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise ValueError(f"{p}: no .txt files (one UTF-8 text file per client)")
        for f in files:
            try:
                out[f.stem] = [t for t in f.read_text(encoding="utf-8").split("\n\n") if t.strip()]
            except UnicodeDecodeError as e:
                raise ValueError(f"{f}: not UTF-8 ({e.reason} at byte {e.start})") from None
        return out
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not JSON ({e.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("client"), (str, int))
                    and isinstance(rec.get("text"), str)):
                raise ValueError(f'{p}:{i}: expected {{"client": str, "text": str}}')
            out.setdefault(str(rec["client"]), []).append(rec["text"])
    if not out:
        raise ValueError(f"{p}: no records")
    return out


def _ids(texts: list[str], tokenizer, seq_len: int, n: int) -> np.ndarray:
    from simulation.sequences import to_sequences

    if n <= 0 or not texts:
        return np.zeros((0, seq_len), dtype=np.int64)
    return to_sequences(texts, tokenizer, seq_len, n).numpy().astype(np.int64)


def round_robin_sequences(docs: dict[str, list[str]], tokenizer, seq_len: int, n: int, seed: int,
                          key: str) -> tuple[np.ndarray, list[dict]]:
    """Up to ``n`` evaluation windows spread over every document (a held-out role, file or
    article): the documents in an order shuffled by ``seed`` (and ``key``), one window of each in
    turn, then the second window of each, and so on. So 64 sequences span up to 64 speakers, not
    the first few of an alphabetical list. Returns the ids [n, seq_len] and, per row, where it
    came from: ``{"id": document, "window": k}`` (tokens k * width on of the document's stream)."""
    order = _rng(seed, key).permutation(sorted(docs)).tolist() if docs else []
    windows = {d: _ids(docs[d], tokenizer, seq_len, n) for d in order}
    rows, where = [], []
    for k in range(n):
        for d in order:
            if len(rows) == n:
                break
            if k < len(windows[d]):
                rows.append(windows[d][k])
                where.append({"id": d, "window": k})
        if len(rows) == n or all(k + 1 >= len(w) for w in windows.values()):
            break
    ids = np.stack(rows).astype(np.int64) if rows else np.zeros((0, seq_len), dtype=np.int64)
    return ids, where


def ood_sequences(cfg: DataConfig, tokenizer) -> tuple[np.ndarray, list[dict]]:
    """The out-of-domain evaluation set: ``cfg.ood_sequences`` windows drawn in turn across the
    Factbook's countries (``simulation.factbook``), seeded like the held-out roles, and where each
    came from; none when ``ood_sequences`` is 0."""
    if cfg.ood_sequences == 0:
        return np.zeros((0, cfg.seq_len), dtype=np.int64), []
    from simulation.factbook import load_backgrounds

    return round_robin_sequences(load_backgrounds(), tokenizer, cfg.seq_len, cfg.ood_sequences, cfg.seed, "ood")


def build_fleet(cfg: DataConfig, tokenizer, profiles: list[tuple[str, float]]
                ) -> tuple[list[ClientData], np.ndarray, dict]:
    """(clients, server evaluation ids from held-out clients, a description). Profiles are dealt
    by share, deterministically for the seed; a client needs at least one training sequence."""
    from simulation.shakespeare import client_split, load_roles, split_roles

    if cfg.source == "shakespeare":
        roles = load_roles()
        train_roles, held = split_roles(roles, cfg.heldout_fraction, cfg.seed)
        pool = {r.client_id: r for r in train_roles}
        held_docs = {r.client_id: r.speeches for r in held}
        split = {cid: client_split(r, 0.2 if cfg.test_sequences else 0.0, cfg.seed)
                 for cid, r in pool.items()}
        source = "shakespeare (play, role)"
    else:
        texts = _texts_by_client(cfg.source)
        ids = sorted(texts)
        n_held = max(1, int(round(cfg.heldout_fraction * len(ids))))
        held_ids = set(_rng(cfg.seed, "heldout").permutation(ids)[:n_held].tolist())
        if len(held_ids) >= len(ids):
            raise ValueError(f"{cfg.source}: {len(ids)} clients leave none after holding out {n_held}")
        held_docs = {c: texts[c] for c in sorted(held_ids)}
        split = {}
        for c in ids:
            if c in held_ids:
                continue
            t = texts[c]
            k = max(1, int(round(0.2 * len(t)))) if cfg.test_sequences and len(t) > 1 else 0
            split[c] = (t[:len(t) - k], t[len(t) - k:])
        source = str(cfg.source)
    if cfg.iid:
        from simulation.shakespeare import iid_partition

        all_train = [s for cid in sorted(split) for s in split[cid][0]]
        all_test = [s for cid in sorted(split) for s in split[cid][1]]
        shards = iid_partition(all_train, len(split), cfg.seed)
        tests = iid_partition(all_test, len(split), cfg.seed + 1)
        split = {f"iid-{i:05d}": (shards[i], tests[i]) for i in range(len(split))}

    # Eligible: enough characters for the wanted sequences (a cheap bound before tokenizing).
    need_chars = cfg.seq_len * 2
    eligible = sorted(c for c, (tr, _) in split.items() if sum(len(s) for s in tr) >= need_chars)
    order = _rng(cfg.seed, "clients").permutation(len(eligible))
    clients: list[ClientData] = []
    weights = np.array([s for _, s in profiles], dtype=np.float64)
    targets = weights / weights.sum()
    counts = {name: 0 for name, _ in profiles}
    for j in order:
        if len(clients) == cfg.clients:
            break
        cid = eligible[j]
        tr, te = split[cid]
        train = _ids(tr, tokenizer, cfg.seq_len, cfg.train_sequences)
        if len(train) == 0:
            continue
        test = _ids(te, tokenizer, cfg.seq_len, cfg.test_sequences)
        # the profile furthest below its share so far: deterministic, shares met as closely as possible
        k = int(np.argmax([targets[i] * (len(clients) + 1) - counts[n] for i, (n, _) in enumerate(profiles)]))
        name = profiles[k][0]
        counts[name] += 1
        clients.append(ClientData(len(clients), cid, name, train, test))
    if len(clients) < cfg.clients:
        raise ValueError(f"data: only {len(clients)} clients have at least {cfg.seq_len} tokens of "
                         f"training text, {cfg.clients} asked for (lower data.clients or data.seq_len)")
    evals, eval_ids = round_robin_sequences(held_docs, tokenizer, cfg.seq_len, cfg.eval_sequences, cfg.seed,
                                            "evaluation")
    if len(evals) == 0:
        raise ValueError("data: the held-out clients have no full evaluation sequence")
    about = {"source": source, "clients": len(clients), "profiles": counts,
             "train_sequences": int(sum(len(c.train) for c in clients)),
             "test_sequences": int(sum(len(c.test) for c in clients)),
             "eval_sequences": int(len(evals)), "seq_len": cfg.seq_len,
             "eval_documents": len({w["id"] for w in eval_ids}), "eval_ids": eval_ids}
    return clients, evals, about
