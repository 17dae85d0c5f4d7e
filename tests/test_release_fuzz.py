"""The bundle parser and the device's checks answer every input with a refusal, never an exception:
seeded mutated and random bundles (framing, header JSON, hostile JSON, well-formed but extreme
manifests, signed garbage payloads, signed extreme payloads) and freshness statements."""

import collections
import json
import random
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from client.updates import DeviceReleases
from quant import PointParams, QParams, save_qparams
from quant.qparams import model_fingerprint
from quant.release import (LIMITS, MAGIC, TIMESTAMP_MAGIC, Bundle, ReleaseRefused, effective_bounds,
                           key_id, load_payload, make_manifest,
                           make_timestamp, sign_manifest, verify_bundle, verify_timestamp)
from quant.spec import activation_spec, weight_spec

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
MODEL = model_fingerprint([("m.l0.q_proj", (6, 8))])
HOSTILE = [b"1" * 5000, b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 50_000, b"NaN", b"Infinity",
           b"-Infinity", b"1e999", b"\"\\ud800\"", b"null", b"true", b"\"" + b"x" * 70_000 + b"\"",
           b"-1", b"1.5", b"[]", b"{}", b"\"\xff\xfe\"", b"0" * 31, b"{\"k\":1,\"k\":2}", b"\"a\\u0000\""]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {n: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)  # fixed: same counts every run
            for i, n in enumerate(("alice", "bob", "mallory"))}
    pinned = {key_id(keys[n]): keys[n].public_key() for n in ("alice", "bob")}

    def payload(scale=0.02, factor=1.0):
        qp = QParams({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(scale), np.uint8(128)),
                      "m.l0.q_proj:weight": PointParams(weight_spec(8), np.full(6, scale), np.zeros(6))},
                     model=MODEL, version=3, smoothing={"m.l0.q_proj": np.full(8, factor, np.float32)})
        return save_qparams(qp, d / "p.safetensors").read_bytes()

    return keys, pinned, payload


def _signed(keys, payload, signers=("alice", "bob"), **over) -> bytes:
    fields = dict(version=2, profile="int8", model=MODEL, payload=payload, created=NOW - timedelta(days=1),
                  expires=NOW + timedelta(days=30), stage="full", percent=100.0)
    fields.update(over)
    m = make_manifest(**fields)
    return Bundle(m, payload, [sign_manifest(m, keys[s]) for s in signers]).to_bytes()


def _resigned(keys, manifest: dict, payload: bytes, signers) -> bytes:
    """A manifest as an attacker holding ``signers`` would sign it, whatever it says."""
    from quant.release import canonical
    import base64
    sigs = []
    for s in signers:
        try:
            raw = canonical(manifest)
        except ValueError:
            raw = b"x"
        sigs.append({"key_id": key_id(keys[s]), "sig": base64.b64encode(keys[s].sign(raw)).decode()})
    header = json.dumps({"manifest": manifest, "payload_bytes": len(payload), "signatures": sigs},
                        sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return MAGIC + header + b"\n" + payload


def _mutate_bytes(rng, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[i:i + rng.randint(1, 64)]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 64))
        elif op == 3:
            b[i:i] = rng.choice(HOSTILE)[:rng.choice([16, 300, 10**6])]
        else:
            b[i:i] = rng.choice([b"\n", b"{", b"[", b"\"", b",", b":", b"\\", b"0"]) * rng.randint(1, 40)
    return bytes(b)


EXTREME = [None, True, -1, 0, 10**29, 2**63, 1e308, -1e308, 5e-324, 99.99, 100, 100.0001, "", "x" * 5000,
           "full", "canary", "\u202e", "2025-02-30T00:00:00Z", "9999-12-31T23:59:59Z", [], {}, [[[]]],
           {"scale_min": 1e-30, "scale_max": 3e38, "factor_min": 1e-30, "factor_max": 1e30}]


def _mutate_manifest(rng, keys, good: bytes) -> bytes:
    header = json.loads(good[len(MAGIC):].split(b"\n", 1)[0])
    payload = good.split(b"\n", 2)[2]
    m = dict(header["manifest"])
    for _ in range(rng.randint(1, 3)):
        k = rng.choice(sorted(m) + ["extra"])
        m[k] = rng.choice(EXTREME)
    if rng.random() < 0.5:
        return _resigned(keys, m, payload, rng.choice([("alice",), ("alice", "bob"), ("mallory",), ()]))
    header["manifest"] = m
    return MAGIC + json.dumps(header, allow_nan=True).encode() + b"\n" + payload


def _signed_garbage_payload(rng, keys, good_payload: bytes) -> bytes:
    """A payload that is not QParams (or hostile safetensors), correctly hashed and signed by k:
    only the payload parser stands between it and the runtime."""
    p = _mutate_bytes(rng, good_payload) if rng.random() < 0.8 else rng.choice(
        [b"", rng.randbytes(rng.randint(1, 300)), (2**63).to_bytes(8, "little") + b"{}",
         (40).to_bytes(8, "little") + b'{"__metadata__":{"format":"x"}}' + b" " * 9])
    return _signed(keys, p)


def _cases(world, n: int, seed: int):
    keys, _, payload = world
    rng = random.Random(seed)
    good = [_signed(keys, payload()), _signed(keys, payload(0.03), signers=("alice",), stage="canary",
                                                 percent=10.0)]
    good_payload = payload()
    extreme = [payload(1e-30), payload(3e38), payload(0.02, 1e30), payload(0.02, 1e-30)]
    for i in range(n):
        kind = rng.choices(["bytes", "manifest", "signed_payload", "signed_extreme", "random", "hostile"],
                           [40, 25, 15, 5, 10, 5])[0]
        if kind == "bytes":
            yield kind, _mutate_bytes(rng, rng.choice(good))
        elif kind == "manifest":
            yield kind, _mutate_manifest(rng, keys, rng.choice(good))
        elif kind == "signed_payload":
            yield kind, _signed_garbage_payload(rng, keys, good_payload)
        elif kind == "signed_extreme":
            yield kind, _signed(keys, rng.choice(extreme), signers=rng.choice([("alice",), ("alice", "bob")]),
                                **rng.choice([{}, {"stage": "canary", "percent": 99.99},
                                              {"stage": "canary", "percent": 99.99, "canary_max": 100.0}]))
        elif kind == "random":
            yield kind, rng.choice([b"", MAGIC]) + rng.randbytes(rng.randint(0, 400))
        else:
            yield kind, MAGIC + rng.choice(HOSTILE) + b"\n" + rng.randbytes(rng.randint(0, 20))


def _run(world, n, seed):
    keys, pinned, _ = world
    codes, by_kind, errors, accepted = collections.Counter(), collections.Counter(), [], []
    for kind, data in _cases(world, n, seed):
        by_kind[kind] += 1
        try:
            m = verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8", device_id="phone-1")
            accepted.append((m, Bundle.from_bytes(data)))
            codes["accepted"] += 1
        except ReleaseRefused as e:
            codes[e.code] += 1
        except Exception as e:  # noqa: BLE001 -- what the test counts
            errors.append((kind, repr(e)[:200], data[:120]))
    return codes, by_kind, errors, accepted


def test_ten_thousand_mutated_and_random_bundles_are_refused_never_raise(world):
    _, pinned, _ = world
    codes, by_kind, errors, accepted = _run(world, 10_000, seed=14)
    print(f"\nfuzz: generated {sum(by_kind.values())} {dict(by_kind)}; outcome {dict(codes)}; "
          f"exceptions {len(errors)}")
    assert errors == [], errors[:5]
    assert sum(codes.values()) == 10_000
    # every class of refusal the parser and checks own was reached
    assert {"malformed", "tampered_manifest", "too_few_signatures", "implausible", "tampered_payload"} <= set(codes)
    for m, b in accepted:  # what got through is a k-signed release with plausible values
        qp = load_payload(b.payload, MODEL)
        bounds = effective_bounds(m["bounds"])
        assert all(bounds["scale_min"] <= float(np.min(p.scale)) and float(np.max(p.scale)) <= bounds["scale_max"]
                   for p in qp.points.values())
        signers = {s["key_id"] for s in b.signatures} & set(pinned)
        assert len(signers) >= 2 or (m["stage"] == "canary" and m["percent"] <= 10)  # k, or a small canary


def test_the_device_update_call_reports_every_fuzzed_bundle(world, tmp_path):
    keys, pinned, _ = world
    dev = DeviceReleases(tmp_path / "dev", pinned, 2, "int8", MODEL, device_id="phone-1")
    statuses = collections.Counter()
    for _, data in _cases(world, 1500, seed=15):
        statuses[dev.update(lambda p, d: data, now=NOW)["status"]] += 1  # never raises
    assert statuses["refused"] > 1400


def test_freshness_statements_fuzzed_are_frozen_never_raise(world):
    keys, _, _ = world
    rng = random.Random(16)
    good = make_timestamp({"int8": 3}, keys["alice"], NOW, NOW + timedelta(hours=24))
    pub = keys["alice"].public_key()
    codes = collections.Counter()
    for i in range(2000):
        data = _mutate_bytes(rng, good) if i % 4 else TIMESTAMP_MAGIC + rng.choice(HOSTILE)
        try:
            verify_timestamp(data, pub, NOW, "int8")
            codes["ok"] += 1
        except ReleaseRefused as e:
            codes[e.code] += 1
    assert set(codes) <= {"ok", "frozen"} and codes["frozen"] > 1900


@pytest.mark.slow
def test_a_hundred_thousand_bundles(world):
    codes, _, errors, _ = _run(world, 100_000, seed=1414)
    assert errors == [], errors[:5]
    assert LIMITS and sum(codes.values()) == 100_000
