"""Release bundles on the device: every forged, stale or foreign bundle is refused with its own
code and the device keeps running what it ran; canary membership is stable and of the right size."""

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from client.runtime import PatchRefused
from client.updates import DeviceReleases
from quant import PointParams, QParams, save_qparams
from quant.qparams import model_fingerprint
from quant.release import (MAGIC, Bundle, ReleaseRefused, canary_member, canonical, generate_key_pair,
                           key_id, load_private_key, make_manifest, sign_manifest, trusted_keys,
                           verify_bundle)
from quant.spec import activation_spec, weight_spec

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
MODEL = model_fingerprint([("m.l0.q_proj", (6, 8))])


def _qparams(scale=0.02, version=7, model=MODEL):
    return QParams({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(scale), np.uint8(128)),
                    "m.l0.q_proj:weight": PointParams(weight_spec(8), np.full(6, scale), np.zeros(6))},
                   model=model, version=version)


def _payload(tmp_path, scale=0.02, model=MODEL, name="q"):
    return save_qparams(_qparams(scale, model=model), tmp_path / f"{name}.safetensors").read_bytes()


@pytest.fixture(scope="module")
def keys():
    return {n: load_private_key(generate_key_pair()[0]) for n in ("alice", "bob", "carol", "mallory")}


@pytest.fixture
def pinned(keys):
    return {key_id(keys[n]): keys[n].public_key() for n in ("alice", "bob", "carol")}


def _bundle(keys, payload, version, signers=("alice", "bob"), stage="full", percent=100.0,
            profile="int8", model=MODEL, expires=NOW + timedelta(days=30)):
    m = make_manifest(version=version, profile=profile, model=model, payload=payload,
                      created=NOW - timedelta(days=1), expires=expires, stage=stage, percent=percent)
    return Bundle(m, payload, [sign_manifest(m, keys[s]) for s in signers])


class FakeRuntime:
    """What DeviceReleases needs of client.runtime.DeviceRuntime: qparams and patch."""

    def __init__(self, refuse=False):
        self.qparams, self.patched, self.refuse = _qparams(version=40), [], refuse

    def patch(self, qp):
        if self.refuse:
            raise PatchRefused("QParams refused: unknown keys")
        self.patched.append(qp)
        self.qparams = qp


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def device(tmp_path, keys, pinned):
    """A device already running release int8-v1 (scale 0.02), with a runtime."""
    dev = DeviceReleases(tmp_path / "dev", pinned, 2, "int8", MODEL, device_id="phone-1")
    rt = FakeRuntime()
    dev.apply(_bundle(keys, _payload(tmp_path), 1).to_bytes(), runtime=rt, now=NOW)
    return dev, rt


def _tampered_manifest(b: Bundle) -> bytes:
    m = dict(b.manifest, expires="2099-01-01T00:00:00Z")  # a longer life, after signing
    return Bundle(m, b.payload, b.signatures).to_bytes()


def _tampered_payload(b: Bundle) -> bytes:
    raw = b.to_bytes()
    return raw[:-1] + bytes([raw[-1] ^ 1])


def _bad_signature(keys, b: Bundle) -> bytes:
    other = make_manifest(**{**{k: b.manifest[k] for k in ("version", "profile", "model", "created", "expires",
                                                           "stage", "percent")}, "version": 99,
                             "payload": b.payload})
    sigs = [sign_manifest(b.manifest, keys["alice"]), sign_manifest(other, keys["bob"])]  # bob's is for v99
    return Bundle(b.manifest, b.payload, sigs).to_bytes()


CASES = {
    "tampered_payload": lambda k, t: _tampered_payload(_bundle(k, _payload(t, 0.03), 2)),
    "tampered_manifest": lambda k, t: _tampered_manifest(_bundle(k, _payload(t, 0.03), 2)),
    "unknown_key": lambda k, t: _bundle(k, _payload(t, 0.03), 2, signers=("alice", "mallory")).to_bytes(),
    "bad_signature": lambda k, t: _bad_signature(k, _bundle(k, _payload(t, 0.03), 2)),
    "too_few_signatures": lambda k, t: _bundle(k, _payload(t, 0.03), 2, signers=("alice",)).to_bytes(),
    "expired": lambda k, t: _bundle(k, _payload(t, 0.03), 2, expires=NOW - timedelta(seconds=1)).to_bytes(),
    "not_newer": lambda k, t: _bundle(k, _payload(t, 0.03), 1).to_bytes(),  # replay of v1's number
    "wrong_model": lambda k, t: _bundle(k, _payload(t, 0.03, model="0" * 16), 2, model="0" * 16).to_bytes(),
    "wrong_profile": lambda k, t: _bundle(k, _payload(t, 0.03), 2, profile="int16").to_bytes(),
    "malformed": lambda k, t: MAGIC + b'{"manifest": {}, "payload_bytes": 0, "signatures": []}\n',
    "not_in_canary": lambda k, t: _bundle(k, _payload(t, 0.03), 2, signers=("alice",), stage="canary",
                                          percent=0.0).to_bytes(),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_bad_bundle_is_refused_with_its_code_and_nothing_changes(device, keys, tmp_path, code):
    dev, rt = device
    before = _snapshot(dev.dir)
    data = CASES[code](keys, tmp_path)
    with pytest.raises(ReleaseRefused) as exc:
        dev.apply(data, runtime=rt, now=NOW)
    assert exc.value.code == code, str(exc.value)
    assert exc.value.message and code in str(exc.value)
    assert _snapshot(dev.dir) == before  # files and state untouched, no leftover release file
    assert len(rt.patched) == 1 and float(rt.qparams.points["m.l0.q_proj:input"].scale) == pytest.approx(0.02)
    again = DeviceReleases(dev.dir, dev.trusted_keys, 2, "int8", MODEL, device_id="phone-1")
    assert again.manifest()["release"] == "int8-v1" and again.running_version == 1


def test_runtime_refusal_leaves_the_device_as_it_was(device, keys, tmp_path):
    dev, _ = device
    before = _snapshot(dev.dir)
    with pytest.raises(ReleaseRefused) as exc:
        dev.apply(_bundle(keys, _payload(tmp_path, 0.03), 2).to_bytes(), runtime=FakeRuntime(refuse=True), now=NOW)
    assert exc.value.code == "patch_refused" and "unknown keys" in exc.value.message
    assert _snapshot(dev.dir) == before


def test_truncated_and_foreign_files_are_malformed(keys, pinned, tmp_path):
    raw = _bundle(keys, _payload(tmp_path), 1).to_bytes()
    for data, why in [(raw[:-3], "truncated"), (b"PK\x03\x04zip", "not a fedquant bundle"),
                      (raw.replace(b'"stage":"full"', b'"stage":"beta"'), "stage")]:
        with pytest.raises(ReleaseRefused, match=why) as exc:
            verify_bundle(data, pinned, 2, NOW, 0, MODEL, "int8")
        assert exc.value.code == "malformed"


def test_apply_keeps_previous_and_falls_back(device, keys, tmp_path):
    dev, rt = device
    v2 = _bundle(keys, _payload(tmp_path, 0.03), 2).to_bytes()
    m = dev.apply(v2, runtime=rt, now=NOW)
    assert m["release"] == "int8-v2" and dev.state["previous"] == "int8-v1"
    assert float(rt.qparams.points["m.l0.q_proj:input"].scale) == pytest.approx(0.03)
    assert float(dev.qparams().points["m.l0.q_proj:input"].scale) == pytest.approx(0.03)
    back = dev.fall_back(runtime=rt)
    assert back["release"] == "int8-v1" and dev.state["previous"] is None
    assert float(rt.qparams.points["m.l0.q_proj:input"].scale) == pytest.approx(0.02)
    assert rt.qparams.version == 40  # the runtime's no-older check still holds (module doc)
    with pytest.raises(ReleaseRefused) as exc:  # the release fallen back from stays refused
        dev.apply(v2, runtime=rt, now=NOW)
    assert exc.value.code == "not_newer"
    dev.apply(_bundle(keys, _payload(tmp_path, 0.02), 3).to_bytes(), runtime=rt, now=NOW)
    assert dev.running_version == 3
    assert sorted(p.name for p in (dev.dir / "releases").iterdir()) == [
        "int8-v1.manifest.json", "int8-v1.safetensors", "int8-v3.manifest.json", "int8-v3.safetensors"]
    with pytest.raises(ValueError, match="no previous"):
        DeviceReleases(tmp_path / "empty", dev.trusted_keys, 2, "int8", MODEL).fall_back()


def test_canary_needs_one_signature_and_membership(keys, pinned, tmp_path):
    payload = _payload(tmp_path)
    member = next(f"d{i}" for i in range(1000) if canary_member(f"d{i}", "int8-v2", 20))
    outsider = next(f"d{i}" for i in range(1000) if not canary_member(f"d{i}", "int8-v2", 20))
    data = _bundle(keys, payload, 2, signers=("carol",), stage="canary", percent=20).to_bytes()
    assert verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8", device_id=member)["stage"] == "canary"
    for dev_id in (outsider, None):
        with pytest.raises(ReleaseRefused) as exc:
            verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8", device_id=dev_id)
        assert exc.value.code == "not_in_canary"
    # the same release at full needs k = 2: one admin alone cannot reach the whole fleet
    with pytest.raises(ReleaseRefused, match="too_few_signatures"):
        verify_bundle(_bundle(keys, payload, 2, signers=("carol",)).to_bytes(), pinned, 2, NOW, 1, MODEL, "int8")


def test_unknown_key_is_ignored_when_enough_pinned_keys_signed(keys, pinned, tmp_path):
    data = _bundle(keys, _payload(tmp_path), 2, signers=("alice", "mallory", "bob")).to_bytes()
    assert verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8")["version"] == 2  # as TUF does


def test_signatures_cover_canonical_manifest_bytes(keys, tmp_path):
    b = _bundle(keys, _payload(tmp_path), 1)
    raw = canonical(b.manifest)
    assert b" " not in raw and raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    header = b.to_bytes()[len(MAGIC):].split(b"\n", 1)[0]
    assert json.loads(header)["manifest"] == b.manifest and key_id(keys["alice"]) in header.decode()
    assert len(key_id(keys["alice"])) == 16


def test_canary_membership_is_stable_monotone_and_sized():
    ids = [f"device-{i:05d}" for i in range(10_000)]
    at10 = [canary_member(d, "int8-v4", 10) for d in ids]
    at50 = [canary_member(d, "int8-v4", 50) for d in ids]
    assert at10 == [canary_member(d, "int8-v4", 10) for d in ids]  # stable across calls
    assert abs(sum(at10) / 100 - 10) < 3 and abs(sum(at50) / 100 - 50) < 3
    assert all(b for a, b in zip(at10, at50) if a)  # growing the canary never drops a device
    other = [canary_member(d, "int8-v5", 10) for d in ids]
    assert abs(sum(a and b for a, b in zip(at10, other)) / 100 - 1) < 1  # independent per release
    assert not any(canary_member(d, "int8-v4", 0) for d in ids[:100])
    assert all(canary_member(d, "int8-v4", 100) for d in ids[:100])


def test_canary_membership_is_the_same_in_another_process():
    code = ("from quant.release import canary_member; "
            "print(''.join('1' if canary_member(f'device-{i}', 'int8-v4', 30) else '0' for i in range(200)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    assert got == "".join("1" if canary_member(f"device-{i}", "int8-v4", 30) else "0" for i in range(200))


def test_trusted_keys_accept_private_pems_as_their_public_half(keys):
    priv, pub = generate_key_pair()
    assert list(trusted_keys([priv, pub])) == [key_id(load_private_key(priv))]
