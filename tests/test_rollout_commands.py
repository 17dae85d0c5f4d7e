"""``fedquant rollout`` as an admin types it: keygen to full, verify, rollback, audit, and clear
errors (exit code 2) for bad input."""

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from quant import PointParams, QParams, save_qparams
from quant.qparams import model_fingerprint
from quant.spec import activation_spec
from server.rollout_commands import rollout

app = typer.Typer(pretty_exceptions_show_locals=False)


@app.callback()
def _root() -> None:
    """fedquant (test wrapper: simulation/cli.py adds ``rollout`` the same way)."""


app.add_typer(rollout, name="rollout")
runner = CliRunner()


def run(*args, code=0):
    result = runner.invoke(app, ["rollout", *map(str, args)])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def admin(tmp_path, monkeypatch):
    """Three admin keys, a 2-of-3 registry and a run's QParams file, in a working directory."""
    monkeypatch.chdir(tmp_path)
    for n in ("alice", "bob", "carol"):
        assert "private keys/" + n + ".key" in run("keygen", "--out", f"keys/{n}")
    (tmp_path / "pub").mkdir()
    for n in ("alice", "bob", "carol"):
        (tmp_path / "pub" / f"{n}.pub").write_bytes((tmp_path / "keys" / f"{n}.pub").read_bytes())
    assert "full stage needs 2" in run("init", "--trusted-keys", "pub", "--threshold", "2", "--canary-max", "20")
    qp = QParams({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(0.02), np.uint8(128))},
                 model=model_fingerprint([("m.l0.q_proj", (6, 8))]), version=5)
    save_qparams(qp, tmp_path / "int8.safetensors")
    return tmp_path


def test_keygen_makes_a_private_key_only_its_owner_reads(admin):
    assert (admin / "keys/alice.key").stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in (admin / "keys/alice.pub").read_bytes()
    assert "exists; use --force" in run("keygen", "--out", "keys/alice", code=2)


def test_publish_to_full_as_an_admin_types_it(admin):
    out = run("publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key",
              "--expires-days", "30")
    assert "published int8-v1" in out and "served to none: published" in out
    assert "served to 5% of devices" in run("promote", "--release", "int8-v1", "--percent", "5",
                                            "--key", "keys/alice.key")
    out = run("promote", "--release", "int8-v1", "--full", "--key", "keys/alice.key")
    assert "signed by 1 of the 2 admins" in out and "canary 5%" in out
    out = run("promote", "--release", "int8-v1", "--full", "--key", "keys/bob.key", "--out", "v1.bundle")
    assert "int8-v1: full, active, served to all devices; full signatures 2/2" in out
    out = run("status")
    assert "int8-v1" in out and "all devices" in out and "2/2" in out
    assert "OK int8-v1" in run("verify", "--bundle", "v1.bundle")
    assert "OK int8-v1" in run("verify", "--release", "int8-v1", "--trusted-keys", "pub", "--threshold", "2")
    out = run("verify", "--bundle", "v1.bundle", "--trusted-keys", "keys/alice.pub", "--threshold", "2", code=1)
    assert "refused (unknown_key)" in out
    out = run("verify", "--bundle", "v1.bundle", "--running-version", "1", code=1)
    assert "refused (not_newer)" in out
    raw = (admin / "v1.bundle").read_bytes()
    (admin / "bad.bundle").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "refused (tampered_payload)" in run("verify", "--bundle", "bad.bundle", code=1)
    audit = run("audit")
    assert [line.split()[2] for line in audit.strip().splitlines()] == ["init", "publish", "promote", "sign",
                                                                         "promote"]


def test_pause_resume_and_rollback(admin):
    for _ in range(2):
        run("publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key")
    run("promote", "--release", "int8-v1", "--full", "--key", "keys/alice.key", "--key", "keys/carol.key")
    run("promote", "--release", "int8-v2", "--percent", "20", "--key", "keys/bob.key")
    assert "served to none: paused" in run("pause", "--release", "int8-v2")
    assert "served to 20% of devices" in run("resume", "--release", "int8-v2")
    out = run("rollback", "--profile", "int8", "--key", "keys/alice.key", "--key", "keys/bob.key")
    assert "int8-v3 carries the payload of int8-v1" in out and "int8-v3: full" in out
    out = run("status", "--profile", "int8")
    assert "none: rolled" in out and "(= int8-v1)" in out  # the table wraps at 80 columns


def test_bad_input_is_a_clear_error(admin):
    assert "no such QParams file" in run("publish", "--qparams", "nope.safetensors", "--profile", "int8",
                                         "--key", "keys/alice.key", code=2)
    assert "cannot read private key" in run("publish", "--qparams", "int8.safetensors", "--profile", "int8",
                                            "--key", "keys/nobody.key", code=2)
    assert "not an unencrypted PEM private key" in run(
        "publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.pub", code=2)
    assert "unknown release 'int8-v4'" in run("promote", "--release", "int8-v4", "--percent", "5",
                                              "--key", "keys/alice.key", code=2)
    run("publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key",
        "--percent", "10")
    assert "a canary only grows" in run("promote", "--release", "int8-v1", "--percent", "5",
                                        "--key", "keys/alice.key", code=2)
    assert "exactly one of --percent P or --full" in run("promote", "--release", "int8-v1", "--key",
                                                         "keys/alice.key", code=2)
    assert "no registry here" in run("status", "--registry", "other.sqlite", code=2)
    assert "no earlier full release" in run("rollback", "--profile", "int8", "--key", "keys/bob.key", code=2)
    (admin / "junk.bundle").write_bytes(b"hello")
    assert "refused (malformed)" in run("verify", "--bundle", "junk.bundle", code=1)


def _signed_bundle(admin, payload: bytes, version=1) -> bytes:
    """A bundle signed by two admins' key files, whatever its payload holds."""
    from datetime import datetime, timedelta, timezone

    from quant.release import Bundle, load_private_key, make_manifest, sign_manifest

    now = datetime.now(timezone.utc)
    m = make_manifest(version=version, profile="int8", model=model_fingerprint([("m.l0.q_proj", (6, 8))]),
                      payload=payload, created=now, expires=now + timedelta(days=1), stage="full")
    sigs = [sign_manifest(m, load_private_key((admin / f"keys/{n}.key").read_bytes())) for n in ("alice", "bob")]
    return Bundle(m, payload, sigs).to_bytes()


def test_numbers_out_of_range_are_a_clear_error_not_a_traceback(admin):
    pub = ["--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key"]
    for args, msg in [(["--expires-days", "1e9"], "--expires-days 1e+09: must be more than 0 and at most 366"),
                      (["--expires-days", "inf"], "not a finite number"),
                      (["--percent", "nan"], "--percent nan: not a finite number"),
                      (["--percent", "150"], "a canary is in [0, 100)"),
                      (["--percent", "50"], "a canary above 20% needs 2 admin signatures")]:
        out = run("publish", *pub, *args, code=2)
        assert msg in " ".join(out.split()) and "Traceback" not in out, out
    out = run("init", "--registry", "r2.sqlite", "--trusted-keys", "pub", "--canary-max", "100", code=2)
    assert "--canary-max 100: a percent in [0, 100)" in " ".join(out.split())
    assert "Invalid value" in run("audit", "--limit", "0", code=2)
    run("publish", *pub)
    out = run("rollback", "--profile", "int8", "--key", "keys/alice.key", "--expires-days", "1e9", code=2)
    assert "--expires-days" in out and "Traceback" not in out


def test_a_large_canary_needs_k_admins(admin):
    run("publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key")
    out = run("promote", "--release", "int8-v1", "--percent", "99.99", "--key", "keys/alice.key")
    assert "signed by 1 of the 2 admins a canary above 20% needs" in " ".join(out.split())
    assert "canary 0%" in out
    out = run("promote", "--release", "int8-v1", "--percent", "99.99", "--key", "keys/bob.key")
    assert "served to 99.99% of devices" in out


def test_verify_parses_and_checks_the_payload_as_a_device_does(admin):
    from quant import PointParams, QParams, save_qparams

    (admin / "garbage.bundle").write_bytes(_signed_bundle(admin, b"not safetensors at all"))
    out = run("verify", "--bundle", "garbage.bundle", code=1)
    assert "refused (malformed)" in out and "payload is not usable QParams" in out
    qp = QParams({"m.l0.q_proj:input": PointParams(activation_spec(8), np.float32(3e38), np.uint8(128))},
                 model=model_fingerprint([("m.l0.q_proj", (6, 8))]), version=5)
    payload = save_qparams(qp, admin / "huge.safetensors").read_bytes()
    (admin / "huge.bundle").write_bytes(_signed_bundle(admin, payload))
    assert "refused (implausible)" in run("verify", "--bundle", "huge.bundle", code=1)
    (admin / "digits.bundle").write_bytes(b"fedquant.bundle/1\n" + b"1" * 5000 + b"\n")
    out = run("verify", "--bundle", "digits.bundle", code=1)
    assert "refused (malformed)" in out and "Traceback" not in out


def test_timestamp_command_writes_a_statement_devices_check(admin):
    from datetime import datetime, timezone

    from quant.release import load_public_key, verify_timestamp

    run("publish", "--qparams", "int8.safetensors", "--profile", "int8", "--key", "keys/alice.key")
    run("promote", "--release", "int8-v1", "--full", "--key", "keys/alice.key", "--key", "keys/bob.key")
    out = run("timestamp", "--out", "ts.json", "--public-key-out", "timestamp.pub")
    assert 'latest {"int8": 1}' in out
    st = verify_timestamp((admin / "ts.json").read_bytes(), load_public_key((admin / "timestamp.pub").read_bytes()),
                          datetime.now(timezone.utc), "int8")
    assert st["latest"] == {"int8": 1}
