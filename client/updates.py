"""The device side of releases (design.md section 9): verify a bundle, apply it atomically, keep
the previous release to fall back to. numpy + cryptography only (no torch).

State directory::

    state.json                    {"format", "current", "previous", "highest"}  (one atomic write)
    releases/<name>.safetensors   the QParams the device runs (the bundle's payload)
    releases/<name>.manifest.json the manifest and its signatures

A new release's files are written first, then the runtime is patched, then ``state.json`` is
replaced in one rename: a crash at any point leaves the old state whole (a half-written release
file is never pointed at, and is removed by the next apply). ``highest`` is the highest version
ever applied: falling back does not lower it, so the release fallen back from (or any older one)
is refused later; only a newer version -- what the registry's rollback publishes -- is taken.

What a device pins (provisioned with it, not learned from a bundle): the admin keys and k, the
canary ceiling (one signature reaches at most ``canary_max`` percent), and optionally the
registry's timestamp key. With a timestamp key, every poll also checks the registry's signed,
short-lived freshness statement: missing, stale or forged, or naming a newer version than the
device runs after the poll, the poll says ``"frozen"`` (code ``frozen``) -- someone between the
registry and the device may be holding it on an old release (TUF's freeze attack).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

from quant.qparams import QParams, atomic_write_bytes, load_qparams
from quant.release import DEFAULT_CANARY_MAX, Bundle, ReleaseRefused, verify_bundle, verify_timestamp

STATE_FORMAT = "fedquant.device-releases/1"


class DeviceReleases:
    """The releases one device holds for its profile and model."""

    def __init__(self, state_dir, trusted_keys: dict, threshold: int, profile: str,
                 model_fingerprint: str, *, device_id: str | None = None,
                 model_sha256: str | None = None, canary_max: float = DEFAULT_CANARY_MAX,
                 timestamp_key=None):
        self.dir = Path(state_dir)
        self.trusted_keys = dict(trusted_keys)
        self.threshold = int(threshold)
        self.profile = profile
        self.model = model_fingerprint
        self.device_id = device_id
        self.model_sha256 = model_sha256
        self.canary_max = float(canary_max)
        self.timestamp_key = timestamp_key
        self.state = self._read_state()

    # ------------------------------------------------------------------ state

    @property
    def _state_path(self) -> Path:
        return self.dir / "state.json"

    def _read_state(self) -> dict:
        if not self._state_path.is_file():
            return {"format": STATE_FORMAT, "current": None, "previous": None, "highest": 0}
        st = json.loads(self._state_path.read_text())
        if st.get("format") != STATE_FORMAT:
            raise ValueError(f"{self._state_path}: not a {STATE_FORMAT} state file")
        return st

    def _files(self, name: str) -> tuple[Path, Path]:
        return (self.dir / "releases" / f"{name}.safetensors",
                self.dir / "releases" / f"{name}.manifest.json")

    def manifest(self, which: str = "current") -> dict | None:
        name = self.state[which]
        return None if name is None else json.loads(self._files(name)[1].read_text())["manifest"]

    def qparams(self, which: str = "current") -> QParams | None:
        """The QParams of the current (or previous) release, e.g. to patch a runtime at start."""
        name = self.state[which]
        return None if name is None else load_qparams(self._files(name)[0], expect_model=self.model)

    @property
    def running_version(self) -> int:
        m = self.manifest()
        return 0 if m is None else int(m["version"])

    # ------------------------------------------------------------------ changes

    def apply(self, bundle_bytes: bytes, runtime=None, now: datetime | None = None) -> dict:
        """Verify ``bundle_bytes`` and make it the current release (the old current becomes the
        previous); patch ``runtime`` if given. Returns the manifest. Any refusal raises
        ReleaseRefused and leaves the files, the state and the runtime as they were."""
        bundle = Bundle.from_bytes(bundle_bytes)
        m = verify_bundle(bundle, self.trusted_keys, self.threshold, now or datetime.now(timezone.utc),
                          max(int(self.state["highest"]), self.running_version), self.model,
                          self.profile, expect_model_sha256=self.model_sha256, device_id=self.device_id,
                          canary_max=self.canary_max)
        name = m["release"]
        qp_path, man_path = self._files(name)
        atomic_write_bytes(qp_path, bundle.payload)
        atomic_write_bytes(man_path, json.dumps({"manifest": m, "signatures": bundle.signatures},
                                                sort_keys=True, indent=1).encode())
        try:
            qp = load_qparams(qp_path, expect_model=self.model)
            if runtime is not None:
                self._patch(runtime, qp)
        except ReleaseRefused:
            self._forget(name)
            raise
        except ValueError as e:  # a signed payload that is not QParams of this model
            self._forget(name)
            raise ReleaseRefused("malformed", f"{name}: payload is not usable QParams: {e}") from None
        old = self.qparams() if runtime is not None else None
        try:
            self._write_state({"current": name, "previous": self.state["current"],
                               "highest": max(int(self.state["highest"]), int(m["version"]))})
        except BaseException:
            if old is not None:  # the runtime must run what the state says
                self._patch(runtime, old)
            raise
        self._sweep()
        return m

    def update(self, fetch, runtime=None, now: datetime | None = None, timestamp=None) -> dict:
        """One poll: ``fetch(profile, device_id)`` returns the bundle the registry serves this
        device (``server.registry.Registry.release_for`` over whatever transport) or None. Returns
        ``{"status": "applied" | "current" | "none" | "refused" | "frozen", ...}``; a refusal is
        reported, not raised, and changes nothing. "current": the served release has the version
        the device runs (e.g. the full stage of the canary it already took).

        ``timestamp``: the registry's freshness statement (bytes, or a callable returning them,
        e.g. ``Registry.timestamp``), checked when the device pins a timestamp key. "frozen" keeps
        what the poll did otherwise under ``"poll"``: a release may have been applied and still
        not be the newest."""
        now = now or datetime.now(timezone.utc)
        data = fetch(self.profile, self.device_id)
        result = self._poll(data, runtime, now)
        if self.timestamp_key is None:
            return result
        try:
            st = verify_timestamp(timestamp() if callable(timestamp) else timestamp, self.timestamp_key,
                                  now, self.profile)
        except ReleaseRefused as e:
            return {"status": "frozen", "code": e.code, "reason": e.message, "poll": result}
        latest = st["latest"].get(self.profile, 0)
        if latest > self.running_version:
            return {"status": "frozen", "code": "frozen", "poll": result,
                    "reason": f"the registry's statement of {st['issued']} says {self.profile} is at "
                              f"version {latest}; this device runs {self.running_version} and was not "
                              "served a newer one (held back on an old release?)"}
        return result

    def _poll(self, data, runtime, now) -> dict:
        if data is None:
            return {"status": "none"}
        try:
            m = self.apply(data, runtime=runtime, now=now)
        except ReleaseRefused as e:
            if e.code == "not_newer" and Bundle.from_bytes(data).manifest["version"] == self.running_version:
                return {"status": "current", "release": self.state["current"]}
            return {"status": "refused", "code": e.code, "reason": e.message}
        return {"status": "applied", "release": m["release"], "version": m["version"]}

    def fall_back(self, runtime=None) -> dict:
        """Make the previous release current again (patching ``runtime`` if given); returns its
        manifest. The release fallen back from is dropped and stays refused (see module doc)."""
        prev = self.state["previous"]
        if prev is None:
            raise ValueError(f"{self.dir}: no previous release to fall back to")
        if runtime is not None:
            self._patch(runtime, self.qparams("previous"))
        self._write_state({"current": prev, "previous": None, "highest": int(self.state["highest"])})
        self._sweep()
        return self.manifest()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _patch(runtime, qp: QParams) -> None:
        """Patch the runtime, mapping its refusal to ReleaseRefused("patch_refused").

        The release version (checked before) orders releases on a device; a QParams version is
        the server's round counter and a rollback release carries an older one, which the
        runtime's own no-older check would refuse -- so it gets the held version at least."""
        from client.runtime import PatchRefused

        held = getattr(getattr(runtime, "qparams", None), "version", None)
        if held is not None and int(qp.version) < int(held):
            qp = dataclasses.replace(qp, version=int(held))
        try:
            runtime.patch(qp)
        except PatchRefused as e:
            raise ReleaseRefused("patch_refused", str(e)) from None

    def _write_state(self, st: dict) -> None:
        new = {"format": STATE_FORMAT, **st}
        atomic_write_bytes(self._state_path, json.dumps(new, sort_keys=True, indent=1).encode())
        self.state = new

    def _forget(self, name: str) -> None:
        if name not in (self.state["current"], self.state["previous"]):
            for p in self._files(name):
                p.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Remove release files that neither current nor previous names (older releases, and
        leftovers of an apply that crashed before its state write)."""
        keep = {self.state["current"], self.state["previous"]}
        for p in (self.dir / "releases").glob("*"):
            name = p.name.removesuffix(".safetensors").removesuffix(".manifest.json")
            if name not in keep:
                p.unlink(missing_ok=True)
