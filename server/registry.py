"""The release registry: SQLite, changed only in transactions (design.md section 9).

Tables: ``config`` (schema version, the full-stage threshold k), ``admins`` (the n admin public
keys), ``releases`` (one row per version of a profile, payload included), ``signatures`` (over
the canonical manifest of one stage of a release), ``stages`` (the history of every stage and
state change) and ``audit`` (who did what, when). Every change runs in one ``BEGIN IMMEDIATE``
transaction (so two publishers cannot take the same version) that also writes its audit row:
a process killed in the middle leaves the registry as it was before the change. WAL journal,
synchronous=FULL.

A release has a stage (``canary`` with a percent, 0 meaning published but served to no device;
or ``full``) and a state (``active``, ``paused``, ``rolled_back``). Each stage has its own signed
manifest (quant/release.py): a canary step is signed by the admin who takes it, the full stage
needs k of the n admin keys, gathered by each admin running ``promote --full`` with their key.
So does a canary above ``canary_max`` percent (set at init, signed into every manifest): one key
reaches at most that share of a profile's devices.

Every publish derives plausibility bounds from the profile's last full release and the config
(quant.release.derive_bounds), refuses QParams outside them, and signs them into the manifest so
a device holds the payload to the same numbers. Schema 2 (this one) added ``canary_max`` and
``bounds`` to releases and the timestamp key to ``config``; a schema-1 registry is refused with a
message (its manifests are format 1, which devices no longer take).

The registry also holds an online **timestamp key** (made at init; devices pin its public half):
``timestamp()`` signs the newest full version of each profile with a short expiry, TUF's
timestamp role, so a device can tell when it is being held on an old release.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from quant.qparams import load_qparams
from quant.release import (DEFAULT_CANARY_MAX, DEFAULT_FACTOR_RANGE, LIMITS, Bundle, ReleaseRefused,
                           canary_member, canonical, check_plausible, derive_bounds, generate_key_pair,
                           key_id, load_payload, load_private_key, load_public_key, make_manifest,
                           make_timestamp, parse_utc, public_pem, release_name, sha256_hex, sign_manifest,
                           signature_valid, utc_iso)

SCHEMA_VERSION = 2
MAX_EXPIRES_DAYS = 366.0        # a release is re-signed at least yearly; freshness is the timestamp's
MAX_TIMESTAMP_HOURS = 24.0 * 7  # a freshness statement lives hours to days, not months
# Test hook: when set, publish touches this file after inserting the release row and sleeps
# before the commit, so a test can SIGKILL it inside the transaction.
PAUSE_ENV = "FEDQUANT_TEST_PUBLISH_PAUSE"

_SCHEMA = """
CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE admins (key_id TEXT PRIMARY KEY, public_pem TEXT NOT NULL, added TEXT NOT NULL);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version > 0),
    model TEXT NOT NULL,
    model_sha256 TEXT,
    payload BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    stage TEXT NOT NULL CHECK (stage IN ('canary', 'full')),
    percent REAL NOT NULL CHECK (percent >= 0 AND percent <= 100),
    state TEXT NOT NULL CHECK (state IN ('active', 'paused', 'rolled_back')),
    rollback_of TEXT,
    canary_max REAL NOT NULL,
    bounds TEXT NOT NULL,
    UNIQUE (profile, version));
CREATE TABLE signatures (
    release_id INTEGER NOT NULL REFERENCES releases(id),
    manifest_sha256 TEXT NOT NULL,
    stage TEXT NOT NULL,
    key_id TEXT NOT NULL REFERENCES admins(key_id),
    sig TEXT NOT NULL,
    signed TEXT NOT NULL,
    PRIMARY KEY (release_id, manifest_sha256, key_id));
CREATE TABLE stages (
    id INTEGER PRIMARY KEY,
    release_id INTEGER NOT NULL REFERENCES releases(id),
    at TEXT NOT NULL, stage TEXT NOT NULL, percent REAL NOT NULL, state TEXT NOT NULL,
    actor TEXT NOT NULL);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    release TEXT, detail TEXT NOT NULL);
"""


class RegistryError(ValueError):
    """A request the registry refuses; nothing was changed."""


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).replace(microsecond=0)


class Registry:
    """One registry file. Open an existing one with ``Registry(path)``; create one with
    ``Registry.init``. Keys passed in are ``cryptography`` Ed25519 private keys."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise RegistryError(f"{self.path}: no registry here; create one with "
                                "`fedquant rollout init --trusted-keys DIR --threshold K`")
        try:
            self.conn = self._connect(self.path)
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.path}: not a fedquant registry ({e})") from None
        try:
            row = self.conn.execute("SELECT value FROM config WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise RegistryError(f"{self.path}: not a fedquant registry ({e})") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            self.conn.close()
            raise RegistryError(f"{self.path}: registry schema version {row and row[0]}, this code "
                                f"reads version {SCHEMA_VERSION}")

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)  # transactions are explicit
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @classmethod
    def init(cls, path, admin_public_pems, threshold: int, actor: str | None = None, *,
             canary_max: float = DEFAULT_CANARY_MAX, factor_range=DEFAULT_FACTOR_RANGE,
             timestamp_hours: float = 24.0) -> "Registry":
        """Create a registry with its n admin keys, k (the threshold of the full stage and of a
        canary above ``canary_max`` percent), the smoothing factors' plausible range (the run
        config's [min_factor, max_factor]) and the lifetime of a freshness statement."""
        path = Path(path)
        canary_max = _finite(canary_max, "--canary-max")
        if not 0 <= canary_max < 100:
            raise RegistryError(f"--canary-max {canary_max:g}: a percent in [0, 100) (the share one "
                                "signature may reach; 100 would make k of n moot)")
        fmin, fmax = (_finite(f, "factor range") for f in factor_range)
        if not LIMITS["factor_min"] <= fmin < fmax <= LIMITS["factor_max"]:
            raise RegistryError(f"smoothing factor range [{fmin:g}, {fmax:g}] must be increasing and "
                                f"within what devices accept [{LIMITS['factor_min']:g}, {LIMITS['factor_max']:g}]")
        hours = _finite(timestamp_hours, "--timestamp-hours")
        if not 0 < hours <= MAX_TIMESTAMP_HOURS:
            raise RegistryError(f"--timestamp-hours {hours:g}: more than 0, at most {MAX_TIMESTAMP_HOURS:g}")
        if path.exists():
            raise RegistryError(f"{path}: already exists; a registry is initialised once")
        admins = {}
        for pem in admin_public_pems:
            pub = load_public_key(pem)
            admins[key_id(pub)] = public_pem(pub).decode()
        if not admins:
            raise RegistryError("a registry needs at least one admin public key")
        if not 1 <= int(threshold) <= len(admins):
            raise RegistryError(f"threshold {threshold} must be between 1 and the {len(admins)} "
                                "admin key(s)")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = cls._connect(path)
        try:
            with _tx(conn):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                at = _now(None)
                conn.executemany("INSERT INTO config VALUES (?, ?)",
                                 [("schema_version", str(SCHEMA_VERSION)),
                                  ("threshold", str(int(threshold))), ("canary_max", repr(canary_max)),
                                  ("factor_min", repr(fmin)), ("factor_max", repr(fmax)),
                                  ("timestamp_hours", repr(hours)),
                                  ("timestamp_key", generate_key_pair()[0].decode())])
                conn.executemany("INSERT INTO admins VALUES (?, ?, ?)",
                                 [(k, pem, utc_iso(at)) for k, pem in sorted(admins.items())])
                _audit(conn, at, actor or _user(), "init", None,
                       {"admins": sorted(admins), "threshold": int(threshold), "canary_max": canary_max,
                        "factor_range": [fmin, fmax], "timestamp_hours": hours})
        except BaseException:
            conn.close()
            for suffix in ("", "-wal", "-shm"):  # no half-made registry left behind
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            raise
        conn.close()
        return cls(path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ config

    def _config(self, key: str) -> str:
        return self.conn.execute("SELECT value FROM config WHERE key=?", (key,)).fetchone()[0]

    @property
    def threshold(self) -> int:
        return int(self._config("threshold"))

    @property
    def canary_max(self) -> float:
        """The largest canary percent one signature may reach (above it: k of n)."""
        return float(self._config("canary_max"))

    @property
    def factor_range(self) -> tuple[float, float]:
        return float(self._config("factor_min")), float(self._config("factor_max"))

    def _timestamp_key(self):
        return load_private_key(self._config("timestamp_key").encode())

    def timestamp_public_pem(self) -> bytes:
        """The public half of the online timestamp key: what devices pin to check freshness."""
        return public_pem(self._timestamp_key())

    def admin_keys(self) -> dict[str, object]:
        """``{key_id: public key}``: what devices pin."""
        return {r["key_id"]: load_public_key(r["public_pem"].encode())
                for r in self.conn.execute("SELECT key_id, public_pem FROM admins ORDER BY key_id")}

    def _admin(self, key) -> str:
        kid = key_id(key)
        if kid not in self.admin_keys():
            raise RegistryError(f"key {kid} is not an admin key of {self.path}")
        return kid

    def _row(self, name: str) -> sqlite3.Row:
        row = self.conn.execute("SELECT * FROM releases WHERE name=?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in self.conn.execute(
                "SELECT name FROM releases ORDER BY profile, version DESC LIMIT 8")]
            raise RegistryError(f"unknown release {name!r} in {self.path}"
                                + (f" (known: {', '.join(known)})" if known else " (it is empty)"))
        return row

    # ------------------------------------------------------------------ changes

    def publish(self, qparams_path, profile: str, keys, expires_days: float = 30.0, *,
                model_sha256: str | None = None, percent: float = 0.0,
                now: datetime | None = None) -> dict:
        """Add the QParams file as the next version of ``profile``, as a canary at ``percent``
        (0: published, served to no device) signed by ``keys`` (admin keys). The payload is
        the file's bytes as they are."""
        keys = list(keys)
        if not keys:
            raise RegistryError("publish needs an admin key to sign with (--key)")
        kids = [self._admin(k) for k in keys]
        if not profile or not profile.replace("-", "").replace("_", "").isalnum():
            raise RegistryError(f"profile {profile!r}: use letters, digits, '-' and '_'")
        percent = _finite(percent, "--percent")
        if not 0 <= percent < 100:
            raise RegistryError(f"--percent {percent:g}: a canary is in [0, 100); use promote --full")
        if percent > self.canary_max and len(set(kids)) < self.threshold:
            raise RegistryError(f"--percent {percent:g}: a canary above {self.canary_max:g}% needs "
                                f"{self.threshold} admin signatures (give {self.threshold} --key), or "
                                f"publish at most {self.canary_max:g}% and promote")
        expires_days = _days(expires_days)
        qparams_path = Path(qparams_path)
        try:
            payload = qparams_path.read_bytes()
        except OSError as e:
            raise RegistryError(f"{qparams_path}: cannot read QParams file ({e.strerror})") from None
        try:
            qp = load_qparams(qparams_path)
        except ValueError as e:
            raise RegistryError(str(e)) from None
        if not qp.model:
            raise RegistryError(f"{qparams_path}: QParams carry no model fingerprint")
        if qp.meta.get("profile") not in (None, "", profile):
            raise RegistryError(f"{qparams_path}: QParams are for profile {qp.meta['profile']!r}, "
                                f"not {profile!r}")
        at = _now(now)
        expires = at + timedelta(days=expires_days)
        with _tx(self.conn):
            bounds = self._bounds_after(profile)
            try:
                check_plausible(qp, bounds, str(qparams_path))
            except ReleaseRefused as e:
                raise RegistryError(f"refused ({e.code}): {e.message} (bounds from the last full "
                                    f"release of {profile} and the registry's factor range)") from None
            version = 1 + self.conn.execute("SELECT COALESCE(MAX(version), 0) FROM releases "
                                            "WHERE profile=?", (profile,)).fetchone()[0]
            name = release_name(profile, version)
            cur = self.conn.execute(
                "INSERT INTO releases (name, profile, version, model, model_sha256, payload, "
                "payload_sha256, created, expires, stage, percent, state, canary_max, bounds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'canary', ?, 'active', ?, ?)",
                (name, profile, version, qp.model, model_sha256, payload, sha256_hex(payload),
                 utc_iso(at), utc_iso(expires), percent, self.canary_max, json.dumps(bounds)))
            _test_pause()
            row = self.conn.execute("SELECT * FROM releases WHERE id=?", (cur.lastrowid,)).fetchone()
            for k in keys:
                _add_signature(self.conn, row, _manifest(row, "canary", float(percent)), k, at)
            _history(self.conn, row["id"], at, "canary", float(percent), "active", ",".join(kids))
            _audit(self.conn, at, ",".join(kids), "publish", name,
                   {"qparams": str(qparams_path), "payload_sha256": sha256_hex(payload),
                    "model": qp.model, "percent": float(percent), "expires": utc_iso(expires),
                    "bounds": bounds})
        return self.status_row(name, now=at)

    def _bounds_after(self, profile: str, previous=None) -> dict:
        """Bounds for the next release of ``profile``: from ``previous`` (a releases row) or the
        newest full release that was not rolled back; none yet: LIMITS' scales."""
        if previous is None:
            previous = self.conn.execute(
                "SELECT * FROM releases WHERE profile=? AND stage='full' AND state!='rolled_back' "
                "ORDER BY version DESC", (profile,)).fetchone()
        qp = None if previous is None else load_payload(bytes(previous["payload"]), previous["model"])
        return derive_bounds(qp, self.factor_range)

    def sign(self, name: str, key, now: datetime | None = None) -> int:
        """Another admin signs the full stage of ``name``; returns the full-stage signatures."""
        kid = self._admin(key)
        at = _now(now)
        with _tx(self.conn):
            row = self._row(name)
            if row["state"] == "rolled_back" or row["stage"] == "full":
                why = "rolled back" if row["state"] == "rolled_back" else "already full"
                raise RegistryError(f"{name} is {why}: nothing to sign")
            _add_signature(self.conn, row, _manifest(row, "full"), key, at)
            _audit(self.conn, at, kid, "sign", name, {"stage": "full"})
            return len(self._full_signers(row))

    def promote(self, name: str, target, keys=(), now: datetime | None = None) -> dict:
        """Move ``name`` to a larger canary (``target`` a percent, signed by one of ``keys``) or to
        ``"full"``: each key adds its signature to the full manifest, and the stage becomes full
        once k admins signed (fewer: the signatures are kept, the stage stays; the returned row
        says how many are there and needed)."""
        keys = list(keys)
        if not keys:
            raise RegistryError("promote needs an admin key to sign with (--key)")
        kids = [self._admin(k) for k in keys]
        at = _now(now)
        with _tx(self.conn):
            row = self._row(name)
            if row["state"] != "active":
                raise RegistryError(f"{name} is {row['state'].replace('_', ' ')}: "
                                    + ("resume it first" if row["state"] == "paused" else
                                       "a rolled-back release cannot be promoted"))
            if row["stage"] == "full":
                raise RegistryError(f"{name} is already full")
            if at >= parse_utc(row["expires"]):
                raise RegistryError(f"{name} expired at {row['expires']}; publish again")
            newer_full = self.conn.execute(
                "SELECT name FROM releases WHERE profile=? AND stage='full' AND state!='rolled_back' "
                "AND version>? ORDER BY version DESC", (row["profile"], row["version"])).fetchone()
            if newer_full:
                raise RegistryError(f"{name} is older than the full release {newer_full[0]}")
            if target == "full":
                manifest = _manifest(row, "full")
                for k in keys:
                    _add_signature(self.conn, row, manifest, k, at)
                signers = self._full_signers(row)
                done = len(signers) >= self.threshold
                if done:
                    self.conn.execute("UPDATE releases SET stage='full', percent=100 WHERE id=?",
                                      (row["id"],))
                    _history(self.conn, row["id"], at, "full", 100.0, "active", ",".join(kids))
                _audit(self.conn, at, ",".join(kids), "promote" if done else "sign", name,
                       {"stage": "full", "signers": sorted(signers), "threshold": self.threshold})
            else:
                try:
                    pct = float(target)
                except (TypeError, ValueError):
                    raise RegistryError(f"stage {target!r}: a canary percent or 'full'") from None
                if not (math.isfinite(pct) and 0 < pct < 100):
                    raise RegistryError(f"canary percent {pct:g} must be in (0, 100); use --full for all")
                if pct <= row["percent"]:
                    raise RegistryError(f"{name} is at {row['percent']:g}%: a canary only grows "
                                        f"(asked {pct:g}%); pause or roll back instead")
                manifest = _manifest(row, "canary", pct)
                for k in keys:
                    _add_signature(self.conn, row, manifest, k, at)
                signers = self._signers(row, manifest)
                big = pct > row["canary_max"]
                if big and len(signers) < self.threshold:  # one key reaches at most canary_max
                    _audit(self.conn, at, ",".join(kids), "sign", name,
                           {"stage": "canary", "percent": pct, "signers": sorted(signers),
                            "threshold": self.threshold})
                    return self.status_row(name, now=at) | {
                        "pending": f"canary {pct:g}% signed by {len(signers)} of the {self.threshold} "
                                   f"admins a canary above {row['canary_max']:g}% needs"}
                self.conn.execute("UPDATE releases SET percent=? WHERE id=?", (pct, row["id"]))
                _history(self.conn, row["id"], at, "canary", pct, "active", ",".join(kids))
                _audit(self.conn, at, ",".join(kids), "promote", name,
                       {"stage": "canary", "from": row["percent"], "percent": pct}
                       | ({"signers": sorted(signers)} if big else {}))
        return self.status_row(name, now=at)

    def pause(self, name: str, actor: str | None = None, now: datetime | None = None) -> dict:
        """Stop serving ``name`` (devices that took it keep it; the others get the previous full)."""
        return self._set_state(name, "active", "paused", "pause", actor, now)

    def resume(self, name: str, actor: str | None = None, now: datetime | None = None) -> dict:
        return self._set_state(name, "paused", "active", "resume", actor, now)

    def _set_state(self, name, old, new, action, actor, now):
        at = _now(now)
        with _tx(self.conn):
            row = self._row(name)
            if row["state"] != old:
                raise RegistryError(f"cannot {action} {name}: it is {row['state'].replace('_', ' ')}")
            self.conn.execute("UPDATE releases SET state=? WHERE id=?", (new, row["id"]))
            _history(self.conn, row["id"], at, row["stage"], row["percent"], new, actor or _user())
            _audit(self.conn, at, actor or _user(), action, name, {"stage": row["stage"],
                                                                    "percent": row["percent"]})
        return self.status_row(name, now=at)

    def rollback(self, profile: str, keys, expires_days: float = 30.0,
                 now: datetime | None = None) -> dict:
        """Roll ``profile`` back to its previous full release.

        The releases newer than that one become ``rolled_back`` (no longer served) and a **new
        version** carrying the old payload is published: devices never take a version older than
        the one they run, so only a newer number brings back the old parameters on the devices
        that took the bad release. The new release is full at once if ``keys`` hold k admin
        signatures, otherwise a 0 % canary waiting for ``promote --full`` from more admins
        (meanwhile the devices that did not take the bad release keep the old one)."""
        keys = list(keys)
        if not keys:
            raise RegistryError("rollback needs an admin key to sign the new release (--key)")
        kids = [self._admin(k) for k in keys]
        expires_days = _days(expires_days)
        at = _now(now)
        with _tx(self.conn):
            rows = self.conn.execute("SELECT * FROM releases WHERE profile=? AND state!='rolled_back' "
                                     "ORDER BY version", (profile,)).fetchall()
            if not rows:
                raise RegistryError(f"profile {profile!r} has no release to roll back")
            fulls = [r for r in rows if r["stage"] == "full"]
            if fulls and fulls[-1]["version"] == rows[-1]["version"]:
                fulls = fulls[:-1]  # the newest release is itself full: go to the one before
            if not fulls:
                raise RegistryError(f"profile {profile!r} has no earlier full release to roll back to")
            target = fulls[-1]
            bad = [r for r in rows if r["version"] > target["version"]]
            for r in bad:
                self.conn.execute("UPDATE releases SET state='rolled_back' WHERE id=?", (r["id"],))
                _history(self.conn, r["id"], at, r["stage"], r["percent"], "rolled_back", ",".join(kids))
            version = 1 + self.conn.execute("SELECT MAX(version) FROM releases WHERE profile=?",
                                            (profile,)).fetchone()[0]
            name = release_name(profile, version)
            cur = self.conn.execute(
                "INSERT INTO releases (name, profile, version, model, model_sha256, payload, "
                "payload_sha256, created, expires, stage, percent, state, rollback_of, canary_max, "
                "bounds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'canary', 0, 'active', ?, ?, ?)",
                (name, profile, version, target["model"], target["model_sha256"], target["payload"],
                 target["payload_sha256"], utc_iso(at), utc_iso(at + timedelta(days=expires_days)),
                 target["name"], self.canary_max, json.dumps(self._bounds_after(profile, target))))
            row = self.conn.execute("SELECT * FROM releases WHERE id=?", (cur.lastrowid,)).fetchone()
            for k in keys:
                _add_signature(self.conn, row, _manifest(row, "canary", 0.0), k, at)
                _add_signature(self.conn, row, _manifest(row, "full"), k, at)
            full = len(self._full_signers(row)) >= self.threshold
            if full:
                self.conn.execute("UPDATE releases SET stage='full', percent=100 WHERE id=?", (row["id"],))
            _history(self.conn, row["id"], at, "full" if full else "canary", 100.0 if full else 0.0,
                     "active", ",".join(kids))
            _audit(self.conn, at, ",".join(kids), "rollback", name,
                   {"to": target["name"], "rolled_back": [r["name"] for r in bad], "full": full})
        return self.status_row(name, now=at)

    # ------------------------------------------------------------------ reads

    def _full_signers(self, row) -> set[str]:
        return self._signers(row, _manifest(row, "full"))

    def _signers(self, row, manifest) -> set[str]:
        admins = self.admin_keys()
        out = set()
        for s in self.conn.execute("SELECT key_id, sig FROM signatures WHERE release_id=? AND "
                                   "manifest_sha256=?", (row["id"], sha256_hex(canonical(manifest)))):
            if s["key_id"] in admins and signature_valid(manifest, dict(s), admins[s["key_id"]]):
                out.add(s["key_id"])
        return out

    def export_bundle(self, name: str) -> bytes:
        """The bundle of ``name`` at its current stage, with every signature over that manifest."""
        row = self._row(name)
        manifest = _manifest(row, row["stage"], row["percent"])
        sigs = [{"key_id": s["key_id"], "sig": s["sig"]} for s in self.conn.execute(
            "SELECT key_id, sig FROM signatures WHERE release_id=? AND manifest_sha256=? "
            "ORDER BY key_id", (row["id"], sha256_hex(canonical(manifest))))]
        return Bundle(manifest, bytes(row["payload"]), sigs).to_bytes()

    def _served_full(self, profile: str, at: datetime):
        for r in self.conn.execute("SELECT * FROM releases WHERE profile=? AND stage='full' AND "
                                   "state='active' ORDER BY version DESC", (profile,)):
            if parse_utc(r["expires"]) > at:
                return r
        return None

    def release_for(self, profile: str, device_id: str, now: datetime | None = None) -> bytes | None:
        """The bundle a device of ``profile`` should get: the newest active canary newer than the
        served full release that the device belongs to, else the newest active full release
        (paused, rolled-back and expired releases are never served); None if there is none."""
        at = _now(now)
        full = self._served_full(profile, at)
        for r in self.conn.execute(
                "SELECT * FROM releases WHERE profile=? AND stage='canary' AND state='active' AND "
                "percent>0 AND version>? ORDER BY version DESC",
                (profile, full["version"] if full else 0)):
            if parse_utc(r["expires"]) > at and canary_member(device_id, r["name"], r["percent"]):
                return self.export_bundle(r["name"])
        return self.export_bundle(full["name"]) if full else None

    def timestamp(self, now: datetime | None = None) -> bytes:
        """A fresh freshness statement: the newest served full version of every profile, signed
        with the timestamp key, expiring after the init's ``timestamp_hours``. Serve it beside the
        bundles and re-make it well within that time (it is cheap: one signature)."""
        at = _now(now)
        profiles = [r[0] for r in self.conn.execute("SELECT DISTINCT profile FROM releases ORDER BY profile")]
        latest = {p: f["version"] for p in profiles if (f := self._served_full(p, at)) is not None}
        hours = float(self._config("timestamp_hours"))
        return make_timestamp(latest, self._timestamp_key(), at, at + timedelta(hours=hours))

    def status_row(self, name: str, now: datetime | None = None) -> dict:
        return next(r for r in self.status(now=now, _name=name))

    def status(self, profile: str | None = None, now: datetime | None = None, _name=None) -> list[dict]:
        """One row per release: stage, state, who it is served to (its cohort), signatures."""
        at = _now(now)
        q, args = "SELECT * FROM releases", []
        if profile or _name:
            q += " WHERE " + ("profile=?" if profile else "name=?")
            args.append(profile or _name)
        rows = self.conn.execute(q + " ORDER BY profile, version", args).fetchall()
        k, out, full_of = self.threshold, [], {}
        for r in rows:
            if r["profile"] not in full_of:
                full_of[r["profile"]] = self._served_full(r["profile"], at)
            f = full_of[r["profile"]]
            if r["state"] != "active":
                cohort = f"none: {r['state'].replace('_', ' ')}"
            elif parse_utc(r["expires"]) <= at:
                cohort = "none: expired"
            elif r["stage"] == "full":
                cohort = "all devices" if f is not None and f["id"] == r["id"] else \
                    f"none: superseded by {f['name'] if f else '?'}"
            elif r["percent"] == 0:
                cohort = "none: published"
            elif f is not None and f["version"] > r["version"]:
                cohort = f"none: older than full {f['name']}"
            else:
                cohort = f"{r['percent']:g}% of devices"
            stage = "full" if r["stage"] == "full" else f"canary {r['percent']:g}%"
            signers = sorted(self._signers(r, _manifest(r, r["stage"], r["percent"])))
            out.append({"release": r["name"], "profile": r["profile"], "version": r["version"],
                        "stage": stage, "state": r["state"], "cohort": cohort,
                        "signers": signers, "full_signatures": f"{len(self._full_signers(r))}/{k}",
                        "created": r["created"], "expires": r["expires"], "model": r["model"],
                        "payload_sha256": r["payload_sha256"], "rollback_of": r["rollback_of"]})
        return out

    def history(self, name: str) -> list[dict]:
        row = self._row(name)
        return [dict(r) for r in self.conn.execute(
            "SELECT at, stage, percent, state, actor FROM stages WHERE release_id=? ORDER BY id",
            (row["id"],))]

    def audit(self, release: str | None = None, limit: int | None = None) -> list[dict]:
        q, args = "SELECT * FROM audit", []
        if release:
            q += " WHERE release=?"
            args.append(release)
        q += " ORDER BY id"
        rows = [dict(r) | {"detail": json.loads(r["detail"])} for r in self.conn.execute(q, args)]
        return rows[-limit:] if limit else rows


# ---------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _tx(conn: sqlite3.Connection):
    """One write transaction, taken at once (BEGIN IMMEDIATE), committed or rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _manifest(row, stage: str, percent: float = 100.0) -> dict:
    return make_manifest(version=row["version"], profile=row["profile"], model=row["model"],
                         payload=bytes(row["payload"]), created=row["created"], expires=row["expires"],
                         stage=stage, percent=percent, model_sha256=row["model_sha256"],
                         canary_max=row["canary_max"], bounds=json.loads(row["bounds"]))


def _finite(x, what: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise RegistryError(f"{what} {x!r}: not a number") from None
    if not math.isfinite(x):
        raise RegistryError(f"{what} {x}: not a finite number")
    return x


def _days(x) -> float:
    """An expiry in days, within (0, MAX_EXPIRES_DAYS]: a clear error instead of an overflow."""
    d = _finite(x, "--expires-days")
    if not 0 < d <= MAX_EXPIRES_DAYS:
        raise RegistryError(f"--expires-days {d:g}: must be more than 0 and at most {MAX_EXPIRES_DAYS:g} "
                            "(a release is re-signed at least yearly)")
    return d


def _add_signature(conn, row, manifest: dict, key, at: datetime) -> None:
    s = sign_manifest(manifest, key)
    conn.execute("INSERT OR REPLACE INTO signatures VALUES (?, ?, ?, ?, ?, ?)",
                 (row["id"], sha256_hex(canonical(manifest)),
                  manifest["stage"] if manifest["stage"] == "full" else f"canary {manifest['percent']:g}%",
                  s["key_id"], s["sig"], utc_iso(at)))


def _history(conn, release_id, at, stage, percent, state, actor) -> None:
    conn.execute("INSERT INTO stages (release_id, at, stage, percent, state, actor) VALUES "
                 "(?, ?, ?, ?, ?, ?)", (release_id, utc_iso(at), stage, float(percent), state, actor))


def _audit(conn, at, actor, action, release, detail) -> None:
    conn.execute("INSERT INTO audit (at, actor, action, release, detail) VALUES (?, ?, ?, ?, ?)",
                 (utc_iso(at), actor, action, release, json.dumps(detail, sort_keys=True)))


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


def _test_pause() -> None:
    marker = os.environ.get(PAUSE_ENV)
    if marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(60)
