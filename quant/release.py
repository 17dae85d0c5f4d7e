"""Release bundles: the signed unit a device installs (design.md section 9), and the pure checks.

A bundle is a **manifest** (what the release is, for which profile and model, the sha256 of its
payload, when it expires, its rollout stage), the **payload** (the bytes of a QParams safetensors
file, exactly as ``quant.qparams.save_qparams`` wrote them) and a list of Ed25519 **signatures**
``{"key_id", "sig"}`` over the canonical manifest bytes (JSON, sorted keys, no whitespace, UTF-8).
A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.

The stage is part of what is signed: a manifest says ``"stage": "canary"`` with the ``percent`` of
the profile's devices it is for, or ``"stage": "full"`` (percent 100). One admin's signature is
enough for a *small* canary -- at most ``canary_max`` percent (signed in the manifest, set at the
registry's init, and capped by the ceiling each device pins, DEFAULT_CANARY_MAX unless told) --
anything larger, and the full stage, needs ``threshold`` (k of n, as TUF's root role). Since the
percent is signed too, a device checks its own canary membership, so one key reaches at most
``canary_max`` percent of the fleet. Publishing is a canary at 0 percent: signed, served to no device.

Every manifest carries plausibility ``bounds`` for the payload's values (see ``default_bounds``
and ``derive_bounds``); a device parses the payload and refuses values outside them (intersected
with the LIMITS it pins, which a single signer cannot widen) with the code ``implausible``.

Format 2 (``fedquant.release/2``) added ``canary_max`` and ``bounds``; format-1 manifests are
refused as ``malformed`` with a message saying so: accepting them would let one key's 99 % "canary"
and unbounded values back in.

A **timestamp** (TUF's timestamp role) is a separate, short-lived statement signed by the
registry's online timestamp key: the newest full version of each profile and an expiry. A device
that pins that key refuses a missing, stale or forged statement, and one that says a newer
version exists than the device was served, with the code ``frozen``.

One file, no pickle, no zip::

    fedquant.bundle/1\\n
    {"manifest": {...}, "payload_bytes": N, "signatures": [...]}\\n     (one JSON line)
    <N payload bytes>

The parser treats its input as hostile: every input is answered with a bundle or a
ReleaseRefused, never another exception (tests/test_release_fuzz.py). JSON is read strictly: a
header of at most MAX_HEADER bytes, no NaN/Infinity, no integer longer than 30 digits, no
duplicate keys (two readers must not disagree on what was signed), no nesting deep enough to
exhaust the parser.

Everything here is bytes in, bytes out; files and databases are the callers' (server/registry.py,
client/updates.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

FORMAT = "fedquant.release/2"
MAGIC = b"fedquant.bundle/1\n"
STAGES = ("canary", "full")
CODES = ("tampered_payload", "tampered_manifest", "unknown_key", "bad_signature", "too_few_signatures",
         "expired", "not_newer", "wrong_model", "wrong_profile", "malformed", "not_in_canary",
         "patch_refused",  # canary membership (device side), the runtime's refusal
         "implausible",    # a signed payload whose values are outside the manifest's bounds
         "frozen")         # the freshness statement is missing, stale, forged, or names a newer version
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")

# One signature reaches at most this share of a profile's devices (percent); above it, k of n.
DEFAULT_CANARY_MAX = 10.0
# What a device accepts whatever a manifest says (a single signer cannot widen these). Scales:
# 2^-24 is quant.spec.SCALE_FLOOR (1/s stays finite in float32, survives float16); 2^16 means a
# clip range of 2^16 * 255 for int8 -- far past any activation of a float16 model. Factors:
# SmoothQuant's per-channel multipliers; server.config's SmoothingConfig defaults to [1e-5, 1e5].
LIMITS = {"scale_min": 2.0**-24, "scale_max": 2.0**16, "factor_min": 2.0**-20, "factor_max": 2.0**20}
DEFAULT_FACTOR_RANGE = (1e-5, 1e5)
# A release's scales may lie within this factor of the previous full release's smallest/largest.
DEFAULT_SCALE_GROWTH = 16.0
MAX_HEADER = 1 << 16      # bytes of a bundle's JSON header line (a manifest is ~1 KiB)
MAX_SIGNATURES = 64
TIMESTAMP_FORMAT = "fedquant.timestamp/1"
TIMESTAMP_MAGIC = b"fedquant.timestamp/1\n"


class ReleaseRefused(ValueError):
    """A bundle a device must not apply; ``code`` says which check failed (one of ``CODES``)."""

    def __init__(self, code: str, message: str):
        assert code in CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------ keys

def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM); the private PEM is not encrypted."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv = Ed25519PrivateKey.generate()
    return (priv.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
            priv.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(pem: bytes):
    """An Ed25519 private key from PEM bytes; ValueError if it is anything else."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = ser.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(pem: bytes):
    """An Ed25519 public key from PEM bytes (a private key PEM gives its public half)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"PRIVATE KEY" in pem:
        return load_private_key(pem).public_key()
    try:
        key = ser.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 key ({type(key).__name__})")
    return key


def public_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    pub = key.public_key() if hasattr(key, "public_key") else key
    return pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)


def key_id(key) -> str:
    """sha256 of the raw public key, first 16 hex digits (a private key gives its public key's id)."""
    from cryptography.hazmat.primitives import serialization as ser

    pub = key.public_key() if hasattr(key, "public_key") else key
    return hashlib.sha256(pub.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)).hexdigest()[:16]


def trusted_keys(pems) -> dict[str, object]:
    """``{key_id: public key}`` from PEM bytes (duplicates collapse)."""
    out = {}
    for pem in pems:
        k = load_public_key(pem)
        out[key_id(k)] = k
    return out


# ------------------------------------------------------------------------------ manifest

def utc_iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def canonical(obj) -> bytes:
    """The bytes that are signed: JSON with sorted keys and no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def release_name(profile: str, version: int) -> str:
    return f"{profile}-v{int(version)}"


def default_bounds(factor_range=DEFAULT_FACTOR_RANGE) -> dict:
    """Bounds with no previous release to compare with: LIMITS' scales, the config's factors."""
    return {"scale_min": LIMITS["scale_min"], "scale_max": LIMITS["scale_max"],
            "factor_min": float(factor_range[0]), "factor_max": float(factor_range[1])}


def derive_bounds(previous=None, factor_range=DEFAULT_FACTOR_RANGE,
                  growth: float = DEFAULT_SCALE_GROWTH) -> dict:
    """The bounds a new release is held to: its scales within ``growth`` times the smallest and
    largest scale of ``previous`` (the profile's last full release, a QParams; None: LIMITS),
    never outside LIMITS; smoothing factors within ``factor_range`` (the config's min_factor,
    max_factor). Global, not per point: a few numbers a person can read in the manifest."""
    b = default_bounds(factor_range)
    scales = [_np().asarray(p.scale, dtype=float).ravel() for p in (previous.points.values() if previous else ())]
    scales = [x for x in scales if x.size]
    if scales:
        lo = min(float(x.min()) for x in scales)
        hi = max(float(x.max()) for x in scales)
        b["scale_min"] = max(LIMITS["scale_min"], lo / growth)
        b["scale_max"] = min(LIMITS["scale_max"], hi * growth)
    return b


def effective_bounds(bounds: dict) -> dict:
    """The manifest's bounds narrowed to LIMITS: what a device holds a payload to."""
    return {"scale_min": max(bounds["scale_min"], LIMITS["scale_min"]),
            "scale_max": min(bounds["scale_max"], LIMITS["scale_max"]),
            "factor_min": max(bounds["factor_min"], LIMITS["factor_min"]),
            "factor_max": min(bounds["factor_max"], LIMITS["factor_max"])}


def make_manifest(*, version: int, profile: str, model: str, payload: bytes, created: datetime | str,
                  expires: datetime | str, stage: str, percent: float = 100.0,
                  model_sha256: str | None = None, canary_max: float = DEFAULT_CANARY_MAX,
                  bounds: dict | None = None) -> dict:
    """The manifest of one stage of a release. Same inputs, same bytes: every admin signing the
    full stage signs the identical manifest."""
    m = {"format": FORMAT, "release": release_name(profile, version), "version": int(version),
         "profile": profile, "model": model, "model_sha256": model_sha256,
         "payload_sha256": sha256_hex(payload), "payload_bytes": len(payload),
         "created": created if isinstance(created, str) else utc_iso(created),
         "expires": expires if isinstance(expires, str) else utc_iso(expires),
         "stage": stage, "percent": 100.0 if stage == "full" else float(percent),
         "canary_max": float(canary_max),
         "bounds": {k: float(v) for k, v in (bounds or default_bounds()).items()}}
    check_manifest(m)
    return m


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_manifest(m) -> None:
    """Raise ReleaseRefused("malformed") naming the first field that is missing or of a wrong kind."""
    def bad(msg):
        raise ReleaseRefused("malformed", f"manifest {msg}")
    if not isinstance(m, dict):
        bad("is not a JSON object")
    if m.get("format") == "fedquant.release/1":
        bad(f"format is 'fedquant.release/1', which has no canary limit and no value bounds; this "
            f"device takes {FORMAT!r} only (re-publish the QParams with a current registry)")
    if m.get("format") != FORMAT:
        bad(f"format is {str(m.get('format'))[:40]!r}, expected {FORMAT!r}")
    for k, kind in (("release", str), ("profile", str), ("model", str), ("payload_sha256", str),
                    ("created", str), ("expires", str), ("stage", str)):
        if not isinstance(m.get(k), kind):
            bad(f"field {k!r} missing or not a string")
    for k in ("version", "payload_bytes"):
        if not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] < 0:
            bad(f"field {k!r} missing or not a non-negative integer")
    if not _number(m.get("percent")) or not 0 <= m["percent"] <= 100:
        bad("field 'percent' missing or not in [0, 100]")
    if not _number(m.get("canary_max")) or not 0 <= m["canary_max"] <= 100:
        bad("field 'canary_max' missing or not in [0, 100]")
    b = m.get("bounds")
    if not isinstance(b, dict) or set(b) != set(LIMITS) or not all(_number(v) and v > 0 for v in b.values()):
        bad(f"field 'bounds' must map exactly {sorted(LIMITS)} to positive finite numbers")
    if not (b["scale_min"] < b["scale_max"] and b["factor_min"] < b["factor_max"]):
        bad("bounds: each min must be below its max")
    if m["stage"] not in STAGES:
        bad(f"stage {m['stage'][:20]!r} is not one of {STAGES}")
    if m["stage"] == "full" and m["percent"] != 100:
        bad("a full stage has percent 100")
    if not _HEX64.match(m["payload_sha256"]):
        bad("payload_sha256 is not 64 lowercase hex digits")
    if m.get("model_sha256") is not None and not (isinstance(m["model_sha256"], str)
                                                  and _HEX64.match(m["model_sha256"])):
        bad("model_sha256 is neither null nor 64 lowercase hex digits")
    if m["release"] != release_name(m["profile"], m["version"]):
        bad(f"release {m['release'][:40]!r} does not match profile and version")
    try:
        parse_utc(m["created"]), parse_utc(m["expires"])
    except ValueError:
        bad("created/expires are not UTC times like 2025-01-31T12:00:00Z")
    extra = set(m) - {"format", "release", "version", "profile", "model", "model_sha256",
                      "payload_sha256", "payload_bytes", "created", "expires", "stage", "percent",
                      "canary_max", "bounds"}
    if extra:
        bad(f"has unknown fields {sorted(extra)[:5]}")
    try:
        canonical(m)
    except ValueError:  # e.g. a lone surrogate in a string: no bytes to sign
        bad("cannot be encoded as canonical UTF-8 JSON")


# ------------------------------------------------------------------------------ payload

def _np():
    import numpy as np
    return np


def load_payload(payload: bytes, expect_model: str | None = None, name: str = "payload"):
    """The payload's QParams, parsed and validated as quant.qparams.load_qparams does (zero-points
    inside their integer range, finite positive scales and factors); ReleaseRefused("malformed")
    for anything else, never another exception."""
    from quant.qparams import qparams_from_bytes

    try:
        return qparams_from_bytes(bytes(payload), expect_model=expect_model, name=name)
    except ValueError as e:
        msg = str(e)
    except Exception as e:  # noqa: BLE001 -- hostile bytes: a refusal, whatever the reader raised
        msg = f"{name}: unreadable ({type(e).__name__})"
    raise ReleaseRefused("malformed", f"payload is not usable QParams: {msg}")


def check_plausible(qp, bounds: dict, name: str = "release") -> None:
    """Raise ReleaseRefused("implausible") for the first scale or smoothing factor outside
    ``bounds`` (already narrowed to LIMITS by the caller when it is a device)."""
    np = _np()
    for key in sorted(qp.points):
        s = np.asarray(qp.points[key].scale, dtype=np.float64)
        if s.size and (s.min() < bounds["scale_min"] or s.max() > bounds["scale_max"]):
            v = s.min() if s.min() < bounds["scale_min"] else s.max()
            raise ReleaseRefused("implausible", f"{name}: {key} has scale {v:.3g}, outside the "
                                 f"bounds [{bounds['scale_min']:.3g}, {bounds['scale_max']:.3g}]")
    for key in sorted(qp.smoothing):
        f = np.asarray(qp.smoothing[key], dtype=np.float64)
        if f.size and (f.min() < bounds["factor_min"] or f.max() > bounds["factor_max"]):
            v = f.min() if f.min() < bounds["factor_min"] else f.max()
            raise ReleaseRefused("implausible", f"{name}: smoothing {key} has factor {v:.3g}, outside "
                                 f"the bounds [{bounds['factor_min']:.3g}, {bounds['factor_max']:.3g}]")


def sign_manifest(manifest: dict, private_key) -> dict:
    """One signature ``{"key_id", "sig"}`` (sig: base64 of the 64-byte Ed25519 signature)."""
    return {"key_id": key_id(private_key),
            "sig": base64.b64encode(private_key.sign(canonical(manifest))).decode()}


def signature_valid(manifest: dict, signature: dict, public_key) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(signature["sig"], validate=True), canonical(manifest))
        return True
    except (InvalidSignature, ValueError):
        return False


# ------------------------------------------------------------------------------ bundle

@dataclass
class Bundle:
    manifest: dict
    payload: bytes
    signatures: list[dict] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        header = canonical({"manifest": self.manifest, "payload_bytes": len(self.payload),
                            "signatures": self.signatures})
        return MAGIC + header + b"\n" + self.payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "Bundle":
        """Parse a bundle file; ReleaseRefused("malformed") says what is wrong with its framing.
        Nothing here is trusted yet: ``verify_bundle`` does that."""
        def bad(msg):
            raise ReleaseRefused("malformed", f"bundle {msg}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            bad(f"is a {type(data).__name__}, not bytes")
        data = bytes(data)
        if not data.startswith(MAGIC):
            bad(f"does not start with {MAGIC!r} (not a fedquant bundle)")
        end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER + 1)
        if end < 0:
            bad("header line is not terminated (truncated file)" if len(data) <= len(MAGIC) + MAX_HEADER
                else f"header line is longer than {MAX_HEADER} bytes")
        header = strict_json(data[len(MAGIC):end], "header")
        if not isinstance(header, dict) or set(header) != {"manifest", "payload_bytes", "signatures"}:
            bad("header must hold exactly manifest, payload_bytes and signatures")
        payload = data[end + 1:]
        n = header["payload_bytes"]
        if not isinstance(n, int) or isinstance(n, bool) or n != len(payload):
            bad(f"payload is {len(payload)} bytes, the header says {str(n)[:32]} "
                "(truncated or padded file)")
        sigs = header["signatures"]
        if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES or not all(
                isinstance(s, dict) and set(s) == {"key_id", "sig"} and isinstance(s["key_id"], str)
                and _KEY_ID.match(s["key_id"]) and isinstance(s["sig"], str) and len(s["sig"]) <= 128
                for s in sigs):
            bad(f"signatures must be a list of at most {MAX_SIGNATURES} "
                "{key_id: 16 hex digits, sig: base64}")
        check_manifest(header["manifest"])
        return cls(header["manifest"], payload, sigs)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)[:40]!r}")
    return dict(pairs)


def _short_int(s: str) -> int:
    if len(s) > 30:
        raise ValueError(f"an integer of {len(s)} digits")
    return int(s)


def _no_constant(s: str):
    raise ValueError(f"{s} is not a number here")


def strict_json(raw: bytes, what: str):
    """JSON as a hostile sender may write it: refused (malformed) when it is not UTF-8 JSON, has
    NaN/Infinity, an integer over 30 digits or a duplicate key; nesting deep enough to exhaust
    the parser's recursion is refused too (json raises RecursionError before the stack is)."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_short_int,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ReleaseRefused("malformed", f"{what} is not strict JSON ({str(e)[:120]})") from None


def canary_member(device_id: str, release_id: str, percent: float) -> bool:
    """Whether ``device_id`` is in the ``percent`` canary of ``release_id``: sha256 of both gives a
    bucket in [0, 10000); members are the buckets below percent * 100. Stable across processes and
    machines (not Python's salted hash()), independent between releases, and monotone: a device
    in the 5 % canary stays in it at 50 %."""
    h = hashlib.sha256(f"{release_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % 10000 < round(float(percent) * 100)


def verify_bundle(bundle: Bundle | bytes, trusted_keys: dict, threshold: int, now: datetime,
                  running_version: int, expect_model: str, expect_profile: str, *,
                  expect_model_sha256: str | None = None, device_id: str | None = None,
                  canary_threshold: int = 1, check_membership: bool = True,
                  canary_max: float = DEFAULT_CANARY_MAX) -> dict:
    """Every check a device makes before it applies a bundle; returns the manifest or raises
    ReleaseRefused. Order: framing, signatures (nothing else in the manifest is trusted before),
    payload hash, profile, model, the payload parsed and held to the manifest's bounds (narrowed
    to LIMITS: ``implausible``), expiry, version, canary membership.

    Signatures follow TUF: a signature by a key that is not pinned is ignored when enough pinned
    keys signed (code ``unknown_key`` when they did not); a pinned key's signature that does not
    verify is always refused -- ``tampered_manifest`` when none of them verifies (the manifest
    changed after signing), ``bad_signature`` when some do and one does not. A full stage needs
    ``threshold`` distinct pinned signers, and so does a canary above ``canary_max`` percent (the
    smaller of the device's pinned ceiling and the manifest's signed value); a smaller canary
    needs ``canary_threshold``. ``running_version`` is
    the highest version the device has applied: equal or older is a replay or rollback
    (``not_newer``). A canary is applied only by a device that knows its id and is a member
    (``check_membership=False`` skips that, for an admin checking a file).
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.from_bytes(bundle)
    m = bundle.manifest
    check_manifest(m)
    good, bad, unknown = set(), set(), set()
    for s in bundle.signatures:
        pub = trusted_keys.get(s["key_id"])
        if pub is None:
            unknown.add(s["key_id"])
        elif signature_valid(m, s, pub):
            good.add(s["key_id"])
        else:
            bad.add(s["key_id"])
    bad -= good
    if bad and not good:
        raise ReleaseRefused("tampered_manifest", f"{m['release']}: no signature by a pinned key "
                             f"matches the manifest ({len(bad)} fail: {sorted(bad)}); it was changed "
                             "after signing")
    if bad:
        raise ReleaseRefused("bad_signature", f"{m['release']}: the signature of pinned key(s) "
                             f"{sorted(bad)} does not verify (those of {sorted(good)} do)")
    limit = min(float(canary_max), m["canary_max"])
    big = m["stage"] == "full" or m["percent"] > limit
    need = threshold if big else canary_threshold
    if len(good) < need:
        if unknown:
            raise ReleaseRefused("unknown_key", f"{m['release']}: signed by key(s) {sorted(unknown)} "
                                 f"that this device does not pin; {len(good)} pinned signer(s), "
                                 f"{need} needed")
        stage = "full" if m["stage"] == "full" else f"canary {m['percent']:g}% (above {limit:g}%)" \
            if big else f"canary {m['percent']:g}%"
        raise ReleaseRefused("too_few_signatures", f"{m['release']}: the {stage} stage needs {need} "
                             f"signature(s) by pinned keys, has {len(good)} {sorted(good)}")
    got = sha256_hex(bundle.payload)
    if got != m["payload_sha256"] or len(bundle.payload) != m["payload_bytes"]:
        raise ReleaseRefused("tampered_payload", f"{m['release']}: payload sha256 {got[:16]}... "
                             f"does not match the signed {m['payload_sha256'][:16]}...")
    if m["profile"] != expect_profile:
        raise ReleaseRefused("wrong_profile", f"{m['release']} is for profile {m['profile']!r}, "
                             f"this device runs {expect_profile!r}")
    if m["model"] != expect_model:
        raise ReleaseRefused("wrong_model", f"{m['release']} is for model {m['model']!r}, this "
                             f"device runs {expect_model!r}")
    if expect_model_sha256 and m["model_sha256"] and m["model_sha256"] != expect_model_sha256:
        raise ReleaseRefused("wrong_model", f"{m['release']} fits a model file with sha256 "
                             f"{m['model_sha256'][:16]}..., this device's is {expect_model_sha256[:16]}...")
    check_plausible(load_payload(bundle.payload, m["model"], m["release"]),
                    effective_bounds(m["bounds"]), m["release"])
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    if now >= parse_utc(m["expires"]):
        raise ReleaseRefused("expired", f"{m['release']} expired at {m['expires']} "
                             f"(now {utc_iso(now)})")
    if m["version"] <= int(running_version):
        raise ReleaseRefused("not_newer", f"{m['release']}: version {m['version']} is not newer than "
                             f"the device's {int(running_version)} (a rollback or a replay)")
    if m["stage"] == "canary" and check_membership:
        if device_id is None:
            raise ReleaseRefused("not_in_canary", f"{m['release']} is a {m['percent']:g}% canary and "
                                 "this device has no id to check membership")
        if not canary_member(device_id, m["release"], m["percent"]):
            raise ReleaseRefused("not_in_canary", f"{m['release']} is a {m['percent']:g}% canary "
                                 f"that device {device_id!r} is not part of")
    return m


# ------------------------------------------------------------------------------ freshness

def make_timestamp(latest: dict, private_key, issued: datetime, expires: datetime) -> bytes:
    """The registry's freshness statement (TUF's timestamp role): ``latest`` maps each profile to
    the newest version every device of it should run (its full release), signed with the online
    timestamp key and valid until ``expires`` (hours, not days: a device that stops receiving a
    fresh one learns it is cut off)."""
    st = {"format": TIMESTAMP_FORMAT, "latest": {str(k): int(v) for k, v in sorted(latest.items())},
          "issued": utc_iso(issued), "expires": utc_iso(expires)}
    return TIMESTAMP_MAGIC + canonical({"statement": st, "signature": sign_manifest(st, private_key)})


def verify_timestamp(data, public_key, now: datetime, profile: str) -> dict:
    """The statement if it is signed by ``public_key`` and not expired; ReleaseRefused("frozen")
    otherwise (missing, garbage, forged, stale), never another exception."""
    def frozen(msg):
        raise ReleaseRefused("frozen", f"freshness statement {msg}: this device cannot tell whether "
                             "it is being held on an old release")
    if data is None:
        frozen("missing")
    if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(TIMESTAMP_MAGIC) \
            or len(data) > MAX_HEADER:
        frozen("is not a fedquant timestamp")
    try:
        doc = strict_json(bytes(data)[len(TIMESTAMP_MAGIC):], "timestamp")
    except ReleaseRefused as e:
        frozen(f"unreadable ({e.message})")
    st = doc.get("statement") if isinstance(doc, dict) else None
    sig = doc.get("signature") if isinstance(doc, dict) else None
    if not (isinstance(st, dict) and set(st) == {"format", "latest", "issued", "expires"}
            and st["format"] == TIMESTAMP_FORMAT and isinstance(st["latest"], dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in st["latest"].values())
            and isinstance(st["issued"], str) and isinstance(st["expires"], str)
            and isinstance(sig, dict) and set(sig) == {"key_id", "sig"} and isinstance(sig["sig"], str)):
        frozen("is malformed")
    if not signature_valid(st, sig, public_key):
        frozen("is not signed by the pinned timestamp key")
    try:
        expires = parse_utc(st["expires"])
    except ValueError:
        frozen("has no valid expiry")
    if now >= expires:
        frozen(f"expired at {st['expires']} (now {utc_iso(now)})")
    return st
