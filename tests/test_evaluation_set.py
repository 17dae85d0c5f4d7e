"""The server's evaluation set: windows drawn across every held-out document (roles, files,
articles), seeded, with where each came from."""

import numpy as np

from simulation.fleet import round_robin_sequences
from simulation.models import ByteTokenizer


def _docs(n_docs: int, chars: int) -> dict[str, list[str]]:
    return {f"play/ROLE{i:02d}": [f"speech {i} " * (chars // 10)] for i in range(n_docs)}


def test_round_robin_takes_one_window_per_document_before_any_second():
    tok = ByteTokenizer()
    docs = _docs(10, 200)                       # each document holds several 16-byte windows
    ids, where = round_robin_sequences(docs, tok, 16, 10, seed=0, key="evaluation")
    assert ids.shape == (10, 16) and ids.dtype == np.int64
    assert sorted(w["id"] for w in where) == sorted(docs)           # ten documents, one each
    assert all(w["window"] == 0 for w in where)
    ids2, where2 = round_robin_sequences(docs, tok, 16, 25, seed=0, key="evaluation")
    assert [w["window"] for w in where2] == [0] * 10 + [1] * 10 + [2] * 5
    assert where2[:10] == where                                      # same shuffled order each pass
    for row, w in zip(ids2, where2):                                 # each row is that window
        text = list(docs[w["id"]][0].encode()) + [tok.eos_token_id]
        assert row.tolist() == text[16 * w["window"]:16 * (w["window"] + 1)]


def test_round_robin_order_is_seeded_and_skips_short_documents():
    tok = ByteTokenizer()
    docs = {**_docs(6, 200), "play/SHORT": ["hi"]}
    _, a = round_robin_sequences(docs, tok, 16, 6, seed=0, key="evaluation")
    _, b = round_robin_sequences(docs, tok, 16, 6, seed=0, key="evaluation")
    _, c = round_robin_sequences(docs, tok, 16, 6, seed=1, key="evaluation")
    assert a == b and a != c
    assert "play/SHORT" not in {w["id"] for w in a}
    ids, where = round_robin_sequences(docs, tok, 16, 1000, seed=0, key="evaluation")
    assert len(ids) == len(where) < 1000                             # as many as the text holds


def test_shakespeare_evaluation_set_spans_many_held_out_roles():
    from simulation.config import DataConfig
    from simulation.fleet import build_fleet
    from simulation.shakespeare import load_roles, split_roles

    cfg = DataConfig(clients=4, seq_len=32, eval_sequences=64, test_sequences=0)
    _, evals, about = build_fleet(cfg, ByteTokenizer(), [("int8", 1.0)])
    held = {r.client_id for r in split_roles(load_roles(), cfg.heldout_fraction, cfg.seed)[1]}
    assert evals.shape == (64, 32)
    ids = [w["id"] for w in about["eval_ids"]]
    assert len(ids) == 64 and set(ids) <= held
    assert about["eval_documents"] == len(set(ids)) == 64          # 64 different speakers
    assert len({i.split("/")[0] for i in ids}) > 10                 # from many plays
