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
    payload = _payload(tmp_path)  # 10 %: the largest canary one signature reaches by default
    member = next(f"d{i}" for i in range(1000) if canary_member(f"d{i}", "int8-v2", 10))
    outsider = next(f"d{i}" for i in range(1000) if not canary_member(f"d{i}", "int8-v2", 10))
    data = _bundle(keys, payload, 2, signers=("carol",), stage="canary", percent=10).to_bytes()
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


# ------------------------------------------------------------------ issue 14, goal 4: one key cannot abuse

def _qp_with(scale=0.02, factor=None, model=MODEL):
    qp = _qparams(scale, model=model)
    if factor is not None:
        qp.smoothing["m.l0.q_proj"] = np.full(8, factor, np.float32)
    return qp


@pytest.mark.parametrize("percent, canary_max", [(10.01, 10.0), (99.99, 10.0), (99.99, 100.0), (50, 25.0)])
def test_one_signature_reaches_at_most_a_small_canary(keys, pinned, tmp_path, percent, canary_max):
    """A 99.99 % "canary" by one key is refused by the device, even when that key signs
    canary_max 100 into the manifest: the device's pinned ceiling (10 %) still holds."""
    payload = _payload(tmp_path)
    data = _bundle(keys, payload, 2, signers=("mallory", "carol"), stage="canary", percent=percent)
    m = dict(data.manifest, canary_max=canary_max)
    one = Bundle(m, payload, [sign_manifest(m, keys["carol"])]).to_bytes()
    member = next(f"d{i}" for i in range(1000) if canary_member(f"d{i}", "int8-v2", percent))
    with pytest.raises(ReleaseRefused) as exc:
        verify_bundle(one, pinned, 2, NOW, 1, MODEL, "int8", device_id=member)
    assert exc.value.code == "too_few_signatures" and "above 10%" in exc.value.message
    two = Bundle(m, payload, [sign_manifest(m, keys[n]) for n in ("carol", "bob")]).to_bytes()
    assert verify_bundle(two, pinned, 2, NOW, 1, MODEL, "int8", device_id=member)["percent"] == percent


def test_a_registry_can_narrow_the_canary_ceiling_but_not_widen_it(keys, pinned, tmp_path):
    payload = _payload(tmp_path)
    member = next(f"d{i}" for i in range(1000) if canary_member(f"d{i}", "int8-v2", 8))
    b = _bundle(keys, payload, 2, signers=("carol",), stage="canary", percent=8)
    m = dict(b.manifest, canary_max=5.0)  # the registry's policy: 5 %
    with pytest.raises(ReleaseRefused, match="above 5%"):
        verify_bundle(Bundle(m, payload, [sign_manifest(m, keys["carol"])]).to_bytes(), pinned, 2, NOW, 1,
                      MODEL, "int8", device_id=member)


@pytest.mark.parametrize("scale, factor, what", [(1e-30, None, "scale 1e-30"), (3e38, None, "scale 3e+38"),
                                                 (0.02, 1e30, "factor 1e+30"), (0.02, 1e-30, "factor 1e-30")])
def test_absurd_but_finite_values_are_implausible_on_the_device(device, keys, tmp_path, scale, factor, what):
    dev, rt = device
    before = _snapshot(dev.dir)
    payload = save_qparams(_qp_with(scale, factor), tmp_path / "x.safetensors").read_bytes()
    for data in (_bundle(keys, payload, 2).to_bytes(), _bundle(keys, payload, 2, signers=("alice",),
                                                               stage="canary", percent=0).to_bytes()):
        with pytest.raises(ReleaseRefused) as exc:
            dev.apply(data, runtime=rt, now=NOW)
        assert exc.value.code == "implausible" and what in exc.value.message
    assert dev.update(lambda p, d: _bundle(keys, payload, 2).to_bytes(), runtime=rt, now=NOW)["code"] == "implausible"
    assert _snapshot(dev.dir) == before and len(rt.patched) == 1


def test_signed_bounds_narrow_what_the_device_accepts(keys, pinned, tmp_path):
    payload = _payload(tmp_path, 0.5)
    bounds = {"scale_min": 2.0**-24, "scale_max": 0.25, "factor_min": 1e-5, "factor_max": 1e5}
    m = make_manifest(version=2, profile="int8", model=MODEL, payload=payload, created=NOW, stage="full",
                      expires=NOW + timedelta(days=1), bounds=bounds)
    data = Bundle(m, payload, [sign_manifest(m, keys[n]) for n in ("alice", "bob")]).to_bytes()
    with pytest.raises(ReleaseRefused, match="implausible: int8-v2: m.l0.q_proj:input has scale 0.5"):
        verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8")


def test_format_1_manifests_are_refused_clearly(keys, pinned, tmp_path):
    b = _bundle(keys, _payload(tmp_path), 2)
    m = {k: v for k, v in b.manifest.items() if k not in ("canary_max", "bounds")} | {"format": "fedquant.release/1"}
    data = Bundle(m, b.payload, [sign_manifest(m, keys[n]) for n in ("alice", "bob")]).to_bytes()
    with pytest.raises(ReleaseRefused, match="malformed: .*no canary limit and no value bounds"):
        verify_bundle(data, pinned, 2, NOW, 1, MODEL, "int8")


@pytest.mark.parametrize("header, why", [
    (b'{"manifest":{},"payload_bytes":' + b"1" * 5000 + b',"signatures":[]}', "integer of 5000 digits"),
    (b"[" * 20_000 + b"]" * 20_000, "not strict JSON"),
    (b'{"manifest":{},"payload_bytes":NaN,"signatures":[]}', "NaN is not a number"),
    (b'{"manifest":{},"manifest":{},"payload_bytes":0,"signatures":[]}', "duplicate key 'manifest'"),
    (b'{"manifest":{},"payload_bytes":0,"signatures":[]' + b" " * 70_000 + b"}", "longer than 65536"),
])
def test_unsigned_garbage_is_malformed_on_the_device_never_an_exception(device, header, why):
    dev, rt = device
    data = MAGIC + header + b"\n"
    with pytest.raises(ReleaseRefused, match=why) as exc:
        dev.apply(data, runtime=rt, now=NOW)
    assert exc.value.code == "malformed"
    assert dev.update(lambda p, d: data, now=NOW)["code"] == "malformed"


def test_a_device_pinning_the_timestamp_key_says_when_it_is_frozen(device, keys, tmp_path):
    from quant.release import make_timestamp

    dev, rt = device  # runs int8-v1
    ts_key = load_private_key(generate_key_pair()[0])
    dev.timestamp_key = ts_key.public_key()
    v1 = lambda p, d: _bundle(keys, _payload(tmp_path), 1).to_bytes()  # noqa: E731
    fresh = make_timestamp({"int8": 1}, ts_key, NOW, NOW + timedelta(hours=24))
    assert dev.update(v1, now=NOW, timestamp=fresh)["status"] == "current"
    cases = {
        "missing": None,
        "expired at": make_timestamp({"int8": 1}, ts_key, NOW - timedelta(days=2), NOW - timedelta(days=1)),
        "not signed by the pinned": make_timestamp({"int8": 1}, keys["mallory"], NOW, NOW + timedelta(hours=1)),
        "says int8 is at version 2": make_timestamp({"int8": 2}, ts_key, NOW, NOW + timedelta(hours=1)),
        "not a fedquant timestamp": b"garbage",
    }
    for why, st in cases.items():
        r = dev.update(v1, now=NOW, timestamp=st)
        assert r["status"] == "frozen" and r["code"] == "frozen" and why in r["reason"], (why, r)
        assert r["poll"]["status"] == "current"
    v2 = lambda p, d: _bundle(keys, _payload(tmp_path, 0.03), 2).to_bytes()  # noqa: E731
    r = dev.update(v2, runtime=rt, now=NOW, timestamp=lambda: cases["says int8 is at version 2"])
    assert r == {"status": "applied", "release": "int8-v2", "version": 2}
