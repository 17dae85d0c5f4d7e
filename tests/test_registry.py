"""The release registry: versions per profile, k-of-n for full, pause, rollback, audit, what each
device is served, and a publish killed inside its transaction leaves no trace."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from client.updates import DeviceReleases
from quant import PointParams, QParams, save_qparams
from quant.qparams import model_fingerprint
from quant.release import (Bundle, ReleaseRefused, canary_member, generate_key_pair, key_id,
                           load_private_key, load_public_key, public_pem, verify_bundle)
from quant.spec import activation_spec
from server.registry import PAUSE_ENV, Registry, RegistryError

MODEL = model_fingerprint([("m.l0.q_proj", (6, 8))])
ROOT = Path(__file__).resolve().parents[1]


def _qp_file(path, scale=0.02, profile=None):
    qp = QParams({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(scale), np.uint8(128))},
                 model=MODEL, version=3, meta={"profile": profile} if profile else {})
    return save_qparams(qp, path)


@pytest.fixture(scope="module")
def keys():
    return {n: load_private_key(generate_key_pair()[0]) for n in ("alice", "bob", "carol", "mallory")}


@pytest.fixture
def reg(tmp_path, keys):
    r = Registry.init(tmp_path / "reg.sqlite", [public_pem(keys[n]) for n in ("alice", "bob", "carol")], 2,
                      actor="test", canary_max=25)  # these tests take one-key canaries up to 25 %
    yield r
    r.close()


def _tables(path):
    with sqlite3.connect(path) as c:
        return {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("releases", "signatures", "stages", "audit")}


def test_init_stores_admins_and_threshold_and_refuses_nonsense(reg, keys, tmp_path):
    assert reg.threshold == 2 and set(reg.admin_keys()) == {key_id(keys[n]) for n in ("alice", "bob", "carol")}
    with pytest.raises(RegistryError, match="already exists"):
        Registry.init(reg.path, [public_pem(keys["alice"])], 1)
    with pytest.raises(RegistryError, match="threshold 3"):
        Registry.init(tmp_path / "x.sqlite", [public_pem(keys["alice"]), public_pem(keys["bob"])], 3)
    assert not (tmp_path / "x.sqlite").exists()
    with pytest.raises(RegistryError, match="no registry here"):
        Registry(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(RegistryError, match="not a fedquant registry"):
        Registry(tmp_path / "junk.sqlite")


def test_versions_grow_per_profile_and_bad_publishes_change_nothing(reg, keys, tmp_path):
    q = _qp_file(tmp_path / "q.safetensors")
    names = [reg.publish(q, p, [keys["alice"]])["release"] for p in ("int8", "int8", "int16", "int8")]
    assert names == ["int8-v1", "int8-v2", "int16-v1", "int8-v3"]
    before = _tables(reg.path)
    for args, match in [((q, "int8", [keys["mallory"]]), "not an admin"),
                        ((tmp_path / "nope.safetensors", "int8", [keys["alice"]]), "cannot read"),
                        ((_qp_file(tmp_path / "p.safetensors", profile="int16"), "int8", [keys["alice"]]),
                         "for profile 'int16'"),
                        ((q, "int8", []), "needs an admin key")]:
        with pytest.raises(RegistryError, match=match):
            reg.publish(*args)
    assert _tables(reg.path) == before


def test_full_needs_k_of_n_admin_signatures(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "q.safetensors"), "int8", [keys["alice"]])
    assert reg.promote("int8-v1", 10, [keys["alice"]])["stage"] == "canary 10%"
    r = reg.promote("int8-v1", "full", [keys["alice"]])
    assert r["stage"] == "canary 10%" and r["full_signatures"] == "1/2"
    r = reg.promote("int8-v1", "full", [keys["alice"]])  # the same admin twice is still one
    assert r["stage"] == "canary 10%" and r["full_signatures"] == "1/2"
    with pytest.raises(RegistryError, match="not an admin"):
        reg.promote("int8-v1", "full", [keys["mallory"]])
    assert reg.sign("int8-v1", keys["bob"]) == 2  # another admin signs; promote then completes
    r = reg.promote("int8-v1", "full", [keys["bob"]])
    assert r["stage"] == "full" and r["cohort"] == "all devices"
    b = Bundle.from_bytes(reg.export_bundle("int8-v1"))
    assert len(b.signatures) == 2
    m = verify_bundle(b, reg.admin_keys(), 2, datetime.now(timezone.utc), 0, MODEL, "int8")
    assert m["stage"] == "full"
    assert [h["stage"] for h in reg.history("int8-v1")] == ["canary", "canary", "full"]


def test_wrong_stage_transitions_are_refused_and_change_nothing(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "q.safetensors"), "int8", [keys["alice"]], percent=20)
    before = _tables(reg.path)
    for target, match in [(10, "only grows"), (100, r"\(0, 100\)"), ("half", "canary percent or 'full'")]:
        with pytest.raises(RegistryError, match=match):
            reg.promote("int8-v1", target, [keys["alice"]])
    with pytest.raises(RegistryError, match="unknown release 'int8-v7'"):
        reg.promote("int8-v7", 50, [keys["alice"]])
    with pytest.raises(RegistryError, match="cannot resume"):
        reg.resume("int8-v1")
    assert _tables(reg.path) == before
    reg.promote("int8-v1", "full", [keys["alice"], keys["carol"]])
    with pytest.raises(RegistryError, match="already full"):
        reg.promote("int8-v1", "full", [keys["bob"]])


def test_release_for_serves_canary_members_and_full_to_the_rest(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "a.safetensors", 0.02), "int8", [keys["alice"]])
    reg.promote("int8-v1", "full", [keys["alice"], keys["bob"]])
    reg.publish(_qp_file(tmp_path / "b.safetensors", 0.03), "int8", [keys["alice"]], percent=25)
    ids = [f"dev{i}" for i in range(400)]
    got = {d: Bundle.from_bytes(reg.release_for("int8", d)).manifest["release"] for d in ids}
    assert all((got[d] == "int8-v2") == canary_member(d, "int8-v2", 25) for d in ids)
    assert 0.15 < sum(v == "int8-v2" for v in got.values()) / len(ids) < 0.35
    assert reg.release_for("int16", "dev1") is None
    reg.pause("int8-v2", actor="ops")
    assert {Bundle.from_bytes(reg.release_for("int8", d)).manifest["release"] for d in ids} == {"int8-v1"}
    assert reg.status_row("int8-v2")["cohort"] == "none: paused"
    with pytest.raises(RegistryError, match="cannot pause int8-v2: it is paused"):
        reg.pause("int8-v2")
    reg.resume("int8-v2", actor="ops")
    assert sum(Bundle.from_bytes(reg.release_for("int8", d)).manifest["release"] == "int8-v2" for d in ids) > 0
    later = datetime.now(timezone.utc) + timedelta(days=31)  # both expired: nothing is served
    assert reg.release_for("int8", "dev1", now=later) is None


def test_devices_follow_the_registry_through_a_rollback(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "a.safetensors", 0.02), "int8", [keys["alice"]])
    reg.promote("int8-v1", "full", [keys["alice"], keys["bob"]])
    reg.publish(_qp_file(tmp_path / "b.safetensors", 0.05), "int8", [keys["alice"]])
    reg.promote("int8-v2", "full", [keys["alice"], keys["carol"]])
    phone = DeviceReleases(tmp_path / "phone", reg.admin_keys(), 2, "int8", MODEL, device_id="p1")
    assert phone.update(reg.release_for) == {"status": "applied", "release": "int8-v2", "version": 2}
    assert phone.update(reg.release_for) == {"status": "current", "release": "int8-v2"}
    with pytest.raises(RegistryError, match="no release to roll back"):
        reg.rollback("int16", [keys["alice"]])
    reg.publish(_qp_file(tmp_path / "a.safetensors", 0.02), "int16", [keys["alice"]])
    reg.promote("int16-v1", "full", [keys["alice"], keys["bob"]])
    with pytest.raises(RegistryError, match="no earlier full"):
        reg.rollback("int16", [keys["alice"]])
    r = reg.rollback("int8", [keys["bob"]])  # one key: the new release waits for a second admin
    assert r["release"] == "int8-v3" and r["stage"] == "canary 0%" and r["rollback_of"] == "int8-v1"
    assert reg.status_row("int8-v2")["state"] == "rolled_back"
    assert Bundle.from_bytes(reg.release_for("int8", "p1")).manifest["release"] == "int8-v1"
    with pytest.raises(ReleaseRefused, match="not_newer"):  # the phone never goes to an older version
        phone.apply(reg.release_for("int8", "p1"))
    assert phone.update(reg.release_for)["code"] == "not_newer" and phone.running_version == 2
    reg.promote("int8-v3", "full", [keys["carol"]])
    b = reg.release_for("int8", "p1")
    assert Bundle.from_bytes(b).payload == Bundle.from_bytes(reg.export_bundle("int8-v1")).payload
    assert phone.apply(b)["version"] == 3
    assert float(phone.qparams().points["m.l0.q_proj:input"].scale) == pytest.approx(0.02)
    with pytest.raises(RegistryError, match="rolled back"):
        reg.promote("int8-v2", "full", [keys["alice"]])
    actions = [(a["action"], a["release"]) for a in reg.audit() if a["release"] != "int16-v1"]
    assert actions == [("init", None), ("publish", "int8-v1"), ("promote", "int8-v1"),
                       ("publish", "int8-v2"), ("promote", "int8-v2"), ("rollback", "int8-v3"),
                       ("promote", "int8-v3")]
    assert reg.audit("int8-v3")[0]["detail"] == {"full": False, "rolled_back": ["int8-v2"], "to": "int8-v1"}


def test_publish_killed_inside_its_transaction_leaves_no_half_release(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "a.safetensors"), "int8", [keys["alice"]])
    before = _tables(reg.path)
    reg.close()
    key_file = tmp_path / "alice.key"
    from cryptography.hazmat.primitives import serialization as ser
    key_file.write_bytes(keys["alice"].private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                     ser.NoEncryption()))
    marker = tmp_path / "inside"
    code = ("import sys; from pathlib import Path; from server.registry import Registry; "
            "from quant.release import load_private_key; "
            "r = Registry(sys.argv[1]); "
            "r.publish(sys.argv[2], 'int8', [load_private_key(Path(sys.argv[3]).read_bytes())])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(reg.path), str(tmp_path / "a.safetensors"),
                             str(key_file)], cwd=ROOT, env=dict(os.environ, **{PAUSE_ENV: str(marker)}))
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert proc.poll() is None, "the publisher exited before reaching its pause"
            assert time.monotonic() < deadline, "the publisher never reached its pause"
            time.sleep(0.02)
        with sqlite3.connect(reg.path, timeout=0.1) as c:  # the row is there, uncommitted, invisible
            assert c.execute("SELECT COUNT(*) FROM releases").fetchone()[0] == 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(reg.path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _tables(reg.path) == before  # no release row, signature, stage or audit of v2
    again = Registry(reg.path)
    assert again.publish(tmp_path / "a.safetensors", "int8", [keys["alice"]])["release"] == "int8-v2"
    assert [r["release"] for r in again.status()] == ["int8-v1", "int8-v2"]
    again.close()


# ------------------------------------------------------------------ issue 14, goal 4

def test_one_key_cannot_take_a_canary_past_canary_max(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "q.safetensors"), "int8", [keys["alice"]])
    before = _tables(reg.path)["releases"]
    with pytest.raises(RegistryError, match="above 25% needs 2 admin signatures"):
        reg.publish(_qp_file(tmp_path / "q.safetensors"), "int8", [keys["alice"]], percent=99.99)
    assert _tables(reg.path)["releases"] == before
    r = reg.promote("int8-v1", 99.99, [keys["alice"]])  # one key: signed, not moved, not served
    assert r["stage"] == "canary 0%" and "signed by 1 of the 2" in r["pending"]
    assert reg.release_for("int8", "dev1") is None
    r = reg.promote("int8-v1", 99.99, [keys["bob"]])  # a second admin: k of n, it moves
    assert r["stage"] == "canary 99.99%" and "pending" not in r
    b = Bundle.from_bytes(reg.export_bundle("int8-v1"))
    assert b.manifest["canary_max"] == 25 and len(b.signatures) == 2
    member = next(f"d{i}" for i in range(100) if canary_member(f"d{i}", "int8-v1", 99.99))
    assert verify_bundle(b, reg.admin_keys(), 2, datetime.now(timezone.utc), 0, MODEL, "int8",
                         device_id=member)["percent"] == 99.99
    with pytest.raises(RegistryError, match=r"canary-max 100: a percent in \[0, 100\)"):
        Registry.init(tmp_path / "x.sqlite", [public_pem(keys["alice"])], 1, canary_max=100)


def test_publish_refuses_implausible_values_and_signs_its_bounds(reg, keys, tmp_path):
    for scale in (1e-30, 3e38):
        with pytest.raises(RegistryError, match=r"refused \(implausible\)"):
            reg.publish(_qp_file(tmp_path / "bad.safetensors", scale), "int8", [keys["alice"]])
    assert _tables(reg.path)["releases"] == 0
    reg.publish(_qp_file(tmp_path / "a.safetensors", 0.02), "int8", [keys["alice"]])
    assert Bundle.from_bytes(reg.export_bundle("int8-v1")).manifest["bounds"]["scale_max"] == 2.0**16
    reg.promote("int8-v1", "full", [keys["alice"], keys["bob"]])
    with pytest.raises(RegistryError, match="outside the bounds"):  # 0.02 * 16 = 0.32 at most now
        reg.publish(_qp_file(tmp_path / "b.safetensors", 0.5), "int8", [keys["alice"]])
    reg.publish(_qp_file(tmp_path / "c.safetensors", 0.3), "int8", [keys["alice"]])
    b = Bundle.from_bytes(reg.export_bundle("int8-v2")).manifest["bounds"]
    assert b["scale_max"] == pytest.approx(0.02 * 16, rel=1e-6) and b["factor_max"] == 1e5


@pytest.mark.parametrize("days", [1e9, float("inf"), float("nan"), 0, -1, 367])
def test_expiry_out_of_range_is_a_clear_error(reg, keys, tmp_path, days):
    with pytest.raises(RegistryError, match="--expires-days"):
        reg.publish(_qp_file(tmp_path / "q.safetensors"), "int8", [keys["alice"]], expires_days=days)


def test_the_registry_timestamp_tells_a_frozen_device(reg, keys, tmp_path):
    reg.publish(_qp_file(tmp_path / "a.safetensors", 0.02), "int8", [keys["alice"]])
    reg.promote("int8-v1", "full", [keys["alice"], keys["bob"]])
    ts_pub = load_public_key(reg.timestamp_public_pem())
    phone = DeviceReleases(tmp_path / "phone", reg.admin_keys(), 2, "int8", MODEL, device_id="p1",
                           timestamp_key=ts_pub)
    assert phone.update(reg.release_for, timestamp=reg.timestamp)["status"] == "applied"
    frozen_v1 = reg.export_bundle("int8-v1")  # a mirror that keeps serving v1
    reg.publish(_qp_file(tmp_path / "b.safetensors", 0.03), "int8", [keys["alice"]])
    reg.promote("int8-v2", "full", [keys["alice"], keys["bob"]])
    r = phone.update(lambda p, d: frozen_v1, timestamp=reg.timestamp)
    assert r["status"] == "frozen" and "int8 is at version 2" in r["reason"]
    stale = reg.timestamp(now=datetime.now(timezone.utc) - timedelta(days=2))  # 24 h statements
    assert "expired" in phone.update(lambda p, d: frozen_v1, timestamp=stale)["reason"]
    assert phone.update(reg.release_for, timestamp=reg.timestamp)["status"] == "applied"
    assert phone.update(reg.release_for, timestamp=reg.timestamp)["status"] == "current"
