"""Release bundles: the signed unit a device installs (design.md section 9), and the pure checks.

A bundle is a **manifest** (what the release is, for which profile and model, the sha256 of its
payload, when it expires, its rollout stage), the **payload** (the bytes of a QParams safetensors
file, exactly as ``quant.qparams.save_qparams`` wrote them) and a list of Ed25519 **signatures**
``{"key_id", "sig"}`` over the canonical manifest bytes (JSON, sorted keys, no whitespace, UTF-8).
A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.

The stage is part of what is signed: a manifest says ``"stage": "canary"`` with the ``percent`` of
the profile's devices it is for, or ``"stage": "full"`` (percent 100). One admin's signature is
enough for a canary, a full release needs ``threshold`` (k of n, as TUF's root role) -- and since
the percent is signed too, a device checks its own canary membership, so one key cannot push a
"canary" to the whole fleet. Publishing is a canary at 0 percent: signed, served to no device.

One file, no pickle, no zip::

    fedquant.bundle/1\\n
    {"manifest": {...}, "payload_bytes": N, "signatures": [...]}\\n     (one JSON line)
    <N payload bytes>

Everything here is bytes in, bytes out; files and databases are the callers' (server/registry.py,
client/updates.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

FORMAT = "fedquant.release/1"
MAGIC = b"fedquant.bundle/1\n"
STAGES = ("canary", "full")
CODES = ("tampered_payload", "tampered_manifest", "unknown_key", "bad_signature", "too_few_signatures",
         "expired", "not_newer", "wrong_model", "wrong_profile", "malformed", "not_in_canary",
         "patch_refused")  # the last two: canary membership (device side), the runtime's refusal
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


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


def make_manifest(*, version: int, profile: str, model: str, payload: bytes, created: datetime | str,
                  expires: datetime | str, stage: str, percent: float = 100.0,
                  model_sha256: str | None = None) -> dict:
    """The manifest of one stage of a release. Same inputs, same bytes: every admin signing the
    full stage signs the identical manifest."""
    m = {"format": FORMAT, "release": release_name(profile, version), "version": int(version),
         "profile": profile, "model": model, "model_sha256": model_sha256,
         "payload_sha256": sha256_hex(payload), "payload_bytes": len(payload),
         "created": created if isinstance(created, str) else utc_iso(created),
         "expires": expires if isinstance(expires, str) else utc_iso(expires),
         "stage": stage, "percent": 100.0 if stage == "full" else float(percent)}
    check_manifest(m)
    return m


def check_manifest(m) -> None:
    """Raise ReleaseRefused("malformed") naming the first field that is missing or of a wrong kind."""
    def bad(msg):
        raise ReleaseRefused("malformed", f"manifest {msg}")
    if not isinstance(m, dict):
        bad("is not a JSON object")
    if m.get("format") != FORMAT:
        bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    for k, kind in (("release", str), ("profile", str), ("model", str), ("payload_sha256", str),
                    ("created", str), ("expires", str), ("stage", str)):
        if not isinstance(m.get(k), kind):
            bad(f"field {k!r} missing or not a string")
    for k in ("version", "payload_bytes"):
        if not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] < 0:
            bad(f"field {k!r} missing or not a non-negative integer")
    if not isinstance(m.get("percent"), (int, float)) or isinstance(m.get("percent"), bool) \
            or not 0 <= m["percent"] <= 100:
        bad("field 'percent' missing or not in [0, 100]")
    if m["stage"] not in STAGES:
        bad(f"stage {m['stage']!r} is not one of {STAGES}")
    if m["stage"] == "full" and m["percent"] != 100:
        bad("a full stage has percent 100")
    if not _HEX64.match(m["payload_sha256"]):
        bad("payload_sha256 is not 64 lowercase hex digits")
    if m.get("model_sha256") is not None and not (isinstance(m["model_sha256"], str)
                                                  and _HEX64.match(m["model_sha256"])):
        bad("model_sha256 is neither null nor 64 lowercase hex digits")
    if m["release"] != release_name(m["profile"], m["version"]):
        bad(f"release {m['release']!r} does not match profile and version")
    try:
        parse_utc(m["created"]), parse_utc(m["expires"])
    except ValueError:
        bad("created/expires are not UTC times like 2025-01-31T12:00:00Z")
    extra = set(m) - {"format", "release", "version", "profile", "model", "model_sha256",
                      "payload_sha256", "payload_bytes", "created", "expires", "stage", "percent"}
    if extra:
        bad(f"has unknown fields {sorted(extra)}")


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
        if not isinstance(data, (bytes, bytearray)) or not data.startswith(MAGIC):
            bad(f"does not start with {MAGIC!r} (not a fedquant bundle)")
        end = data.find(b"\n", len(MAGIC))
        if end < 0:
            bad("header line is not terminated (truncated file)")
        try:
            header = json.loads(data[len(MAGIC):end])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad(f"header is not JSON ({e})")
        if not isinstance(header, dict) or set(header) != {"manifest", "payload_bytes", "signatures"}:
            bad("header must hold exactly manifest, payload_bytes and signatures")
        payload = bytes(data[end + 1:])
        if header["payload_bytes"] != len(payload):
            bad(f"payload is {len(payload)} bytes, the header says {header['payload_bytes']} "
                "(truncated or padded file)")
        sigs = header["signatures"]
        if not isinstance(sigs, list) or not all(
                isinstance(s, dict) and set(s) == {"key_id", "sig"} and isinstance(s["key_id"], str)
                and _KEY_ID.match(s["key_id"]) and isinstance(s["sig"], str) for s in sigs):
            bad("signatures must be a list of {key_id: 16 hex digits, sig: base64}")
        check_manifest(header["manifest"])
        return cls(header["manifest"], payload, sigs)


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
                  canary_threshold: int = 1, check_membership: bool = True) -> dict:
    """Every check a device makes before it applies a bundle; returns the manifest or raises
    ReleaseRefused. Order: framing, signatures (nothing else in the manifest is trusted before),
    payload hash, profile, model, expiry, version, canary membership.

    Signatures follow TUF: a signature by a key that is not pinned is ignored when enough pinned
    keys signed (code ``unknown_key`` when they did not); a pinned key's signature that does not
    verify is always refused -- ``tampered_manifest`` when none of them verifies (the manifest
    changed after signing), ``bad_signature`` when some do and one does not. A full stage needs
    ``threshold`` distinct pinned signers, a canary ``canary_threshold``. ``running_version`` is
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
    need = threshold if m["stage"] == "full" else canary_threshold
    if len(good) < need:
        if unknown:
            raise ReleaseRefused("unknown_key", f"{m['release']}: signed by key(s) {sorted(unknown)} "
                                 f"that this device does not pin; {len(good)} pinned signer(s), "
                                 f"{need} needed")
        raise ReleaseRefused("too_few_signatures", f"{m['release']}: {m['stage']} stage needs {need} "
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
