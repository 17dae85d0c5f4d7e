"""``fedquant rollout``: admin commands over the release registry (design.md section 9).

keygen -> init -> publish -> promote (canary percents, then --full by k admins) ; pause / resume ;
rollback ; status ; audit ; verify ; timestamp. Bad input (numbers out of range included) is a
red error and exit code 2, never a traceback; a bundle that ``verify`` refuses is exit code 1 with
the refusal's code.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

rollout = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                      help="Signed, staged releases of QParams: publish, promote, pause, roll back.")
err = Console(stderr=True)
out = Console()

REGISTRY = typer.Option(Path("runs/registry.sqlite"), "--registry", help="the registry (SQLite) file")
KEYS = typer.Option([], "--key", help="admin private key PEM (repeat for several admins)")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _say(message: str) -> None:
    out.print(escape(message), soft_wrap=True, highlight=False)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        _fail(f"{path}: cannot read {what} ({e.strerror})")


def _private_keys(paths: List[Path]) -> list:
    from quant.release import load_private_key

    keys = []
    for p in paths:
        try:
            keys.append(load_private_key(_read(p, "private key")))
        except ValueError as e:
            _fail(f"{p}: {e}")
    return keys


def _public_pems(paths: List[Path]) -> list[bytes]:
    """PEMs from files, or from every *.pub / *.pem file of a directory."""
    pems = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".pub", ".pem"))
            if not files:
                _fail(f"{p}: no public key files (*.pub, *.pem) in this directory")
            pems += [_read(f, "public key") for f in files]
        else:
            pems.append(_read(p, "public key"))
    if not pems:
        _fail("no trusted keys: give --trusted-keys DIR or files")
    return pems


def _registry(path: Path):
    from server.registry import Registry, RegistryError

    try:
        return Registry(path)
    except RegistryError as e:
        _fail(str(e))


def _guard(fn, *args, **kw):
    from server.registry import RegistryError

    try:
        return fn(*args, **kw)
    except RegistryError as e:
        _fail(str(e))


def _row_line(r: dict) -> str:
    return (f"{r['release']}: {r['stage']}, {r['state'].replace('_', ' ')}, served to {r['cohort']}; "
            f"full signatures {r['full_signatures']}; expires {r['expires']}")


def _write_bundle(reg, name: str, dest: Optional[Path]) -> None:
    if dest is not None:
        from quant.qparams import atomic_write_bytes

        atomic_write_bytes(dest, reg.export_bundle(name))
        _say(f"wrote {dest}")


@rollout.command()
def keygen(
    out_prefix: Path = typer.Option(..., "--out", help="writes OUT.key (private, mode 600) and OUT.pub"),
    force: bool = typer.Option(False, "--force", help="overwrite existing files"),
) -> None:
    """Make an Ed25519 admin key pair."""
    from quant.release import generate_key_pair, key_id, load_public_key

    priv_path, pub_path = Path(f"{out_prefix}.key"), Path(f"{out_prefix}.pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            _fail(f"{p} exists; use --force to overwrite it")
    priv, pub = generate_key_pair()
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    _say(f"key {key_id(load_public_key(pub))}: private {priv_path}, public {pub_path}")


@rollout.command()
def init(
    registry: Path = REGISTRY,
    trusted_keys: List[Path] = typer.Option([], "--trusted-keys", help="admin public keys: a directory or files"),
    threshold: int = typer.Option(1, "--threshold", help="k: admin signatures a full release (or a large canary) needs"),
    canary_max: float = typer.Option(10.0, "--canary-max", help="the largest canary percent one signature may reach"),
    min_factor: float = typer.Option(1e-5, "--min-factor", help="smallest plausible smoothing factor (the run config's)"),
    max_factor: float = typer.Option(1e5, "--max-factor", help="largest plausible smoothing factor (the run config's)"),
    timestamp_hours: float = typer.Option(24.0, "--timestamp-hours", help="lifetime of a freshness statement"),
) -> None:
    """Create a registry with its admin keys (n), the threshold (k) and the canary limit."""
    from server.registry import Registry

    reg = _guard(Registry.init, registry, _public_pems(trusted_keys), threshold, canary_max=canary_max,
                 factor_range=(min_factor, max_factor), timestamp_hours=timestamp_hours)
    _say(f"registry {registry}: {len(reg.admin_keys())} admin keys "
         f"({', '.join(reg.admin_keys())}), full stage needs {reg.threshold}; one signature reaches "
         f"at most a {reg.canary_max:g}% canary")


@rollout.command()
def publish(
    registry: Path = REGISTRY,
    qparams: Path = typer.Option(..., "--qparams", help="QParams file (.safetensors) of a run"),
    profile: str = typer.Option(..., "--profile", help="device profile these QParams are for"),
    key: List[Path] = KEYS,
    expires_days: float = typer.Option(30.0, "--expires-days", help="days until devices refuse it"),
    percent: float = typer.Option(0.0, "--percent", help="start as a canary of this share (0: no device)"),
    model_file: Optional[Path] = typer.Option(None, "--model-file", help="the model file it fits (its sha256 goes in the manifest)"),
    bundle_out: Optional[Path] = typer.Option(None, "--out", help="also write the signed bundle here"),
) -> None:
    """Turn a run's QParams into the next signed release of a profile."""
    from quant.release import sha256_hex

    if not qparams.is_file():
        _fail(f"{qparams}: no such QParams file")
    keys = _private_keys(key)
    model_sha = sha256_hex(_read(model_file, "model file")) if model_file else None
    reg = _registry(registry)
    r = _guard(reg.publish, qparams, profile, keys, expires_days, model_sha256=model_sha, percent=percent)
    _say(f"published {r['release']} (profile {profile}, version {r['version']}, payload "
         f"{r['payload_sha256'][:16]}..., signed by {', '.join(r['signers'])})")
    _say(_row_line(r))
    _write_bundle(reg, r["release"], bundle_out)


@rollout.command()
def promote(
    registry: Path = REGISTRY,
    release: str = typer.Option(..., "--release", help="release name, e.g. int8-v3"),
    percent: Optional[float] = typer.Option(None, "--percent", help="grow the canary to this share"),
    full: bool = typer.Option(False, "--full", help="sign for (and, with k signatures, move to) the full stage"),
    key: List[Path] = KEYS,
    bundle_out: Optional[Path] = typer.Option(None, "--out", help="also write the bundle as now served"),
) -> None:
    """Grow a canary (--percent P) or sign it for everyone (--full; k of n admins)."""
    if (percent is None) == (not full):
        _fail("give exactly one of --percent P or --full")
    keys = _private_keys(key)
    reg = _registry(registry)
    r = _guard(reg.promote, release, "full" if full else percent, keys)
    if r.get("pending"):
        _say(f"{release}: {r['pending']}; another admin runs: fedquant rollout promote --release "
             f"{release} --percent {percent:g} --key THEIR.key")
    elif full and r["stage"] != "full":
        have, need = r["full_signatures"].split("/")
        _say(f"{release}: full stage signed by {have} of the {need} admins it needs; "
             f"another admin runs: fedquant rollout promote --release {release} --full --key THEIR.key")
    _say(_row_line(r))
    _write_bundle(reg, release, bundle_out)


@rollout.command()
def pause(
    registry: Path = REGISTRY,
    release: str = typer.Option(..., "--release"),
) -> None:
    """Stop serving a release (devices that took it keep it until a newer one comes)."""
    r = _guard(_registry(registry).pause, release)
    _say(_row_line(r))


@rollout.command()
def resume(
    registry: Path = REGISTRY,
    release: str = typer.Option(..., "--release"),
) -> None:
    """Serve a paused release again, at the stage it had."""
    r = _guard(_registry(registry).resume, release)
    _say(_row_line(r))


@rollout.command()
def rollback(
    registry: Path = REGISTRY,
    profile: str = typer.Option(..., "--profile"),
    key: List[Path] = KEYS,
    expires_days: float = typer.Option(30.0, "--expires-days"),
) -> None:
    """Go back to the profile's previous full release: the newer ones stop, and the old payload is
    published again under a NEW version (devices never take an older version)."""
    keys = _private_keys(key)
    reg = _registry(registry)
    r = _guard(reg.rollback, profile, keys, expires_days)
    _say(f"{r['release']} carries the payload of {r['rollback_of']}")
    if r["stage"] != "full":
        _say(f"it needs {r['full_signatures']} full-stage signatures: more admins run "
             f"fedquant rollout promote --release {r['release']} --full --key THEIR.key")
    _say(_row_line(r))


@rollout.command()
def status(
    registry: Path = REGISTRY,
    profile: Optional[str] = typer.Option(None, "--profile"),
) -> None:
    """A table of releases: stage, state, the devices it is served to, signatures."""
    reg = _registry(registry)
    rows = reg.status(profile)
    if not rows:
        _say(f"{registry}: no releases" + (f" of profile {profile}" if profile else ""))
        return
    t = Table(title=f"{registry}: full stage needs {reg.threshold} of {len(reg.admin_keys())} admins")
    for col in ("release", "stage", "cohort (served to)", "full sigs", "expires"):
        t.add_column(col, no_wrap=col != "cohort (served to)")
    for r in rows:
        name = r["release"] + (f" (= {r['rollback_of']})" if r["rollback_of"] else "")
        t.add_row(name, r["stage"], r["cohort"], r["full_signatures"], r["expires"][:10])
    out.print(t)


@rollout.command()
def audit(
    registry: Path = REGISTRY,
    release: Optional[str] = typer.Option(None, "--release"),
    limit: int = typer.Option(50, "--limit", min=1),
) -> None:
    """The audit log: who changed what, when."""
    import json

    for a in _registry(registry).audit(release, limit):
        _say(f"{a['at']}  {a['actor']:<17} {a['action']:<8} {a['release'] or '-':<10} "
             f"{json.dumps(a['detail'], sort_keys=True)}")


@rollout.command()
def verify(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="a bundle file"),
    registry: Path = REGISTRY,
    release: Optional[str] = typer.Option(None, "--release", help="verify this release as the registry serves it"),
    trusted_keys: List[Path] = typer.Option([], "--trusted-keys", help="pinned public keys (default: the registry's admins)"),
    threshold: Optional[int] = typer.Option(None, "--threshold", min=1, help="k for the full stage (default: the registry's)"),
    canary_max: Optional[float] = typer.Option(None, "--canary-max", help="the device's canary ceiling (default: the registry's, else 10)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="the device's profile (default: the manifest's)"),
    model: Optional[str] = typer.Option(None, "--model", help="the device's model fingerprint (default: the manifest's)"),
    running_version: int = typer.Option(0, "--running-version", min=0, help="the version the device runs"),
    device_id: Optional[str] = typer.Option(None, "--device-id", help="check canary membership of this device"),
) -> None:
    """Check a bundle as a device would (signatures, hashes, the payload parsed and held to its
    bounds, expiry, version), and say why it fails."""
    import math

    from quant.release import (DEFAULT_CANARY_MAX, Bundle, ReleaseRefused, trusted_keys as keys_of,
                               verify_bundle)

    if (bundle is None) == (release is None):
        _fail("give exactly one of --bundle FILE or --release NAME")
    reg = None
    if release is not None or not trusted_keys or threshold is None:
        if not registry.is_file():
            _fail(f"{registry}: no registry; give --trusted-keys and --threshold")
        reg = _registry(registry)
    data = _guard(reg.export_bundle, release) if release else _read(bundle, "bundle")
    try:
        keys = keys_of(_public_pems(trusted_keys)) if trusted_keys else reg.admin_keys()
    except ValueError as e:
        _fail(f"trusted keys: {e}")
    k = threshold if threshold is not None else reg.threshold
    if canary_max is None:
        canary_max = reg.canary_max if reg is not None else DEFAULT_CANARY_MAX
    if not (math.isfinite(canary_max) and 0 <= canary_max <= 100):
        _fail(f"--canary-max {canary_max}: a percent in [0, 100]")
    try:
        b = Bundle.from_bytes(data)
        m = verify_bundle(b, keys, k, datetime.now(timezone.utc), running_version,
                          model or b.manifest["model"], profile or b.manifest["profile"],
                          device_id=device_id, check_membership=device_id is not None,
                          canary_max=canary_max)
    except ReleaseRefused as e:
        err.print(f"[red]refused ({e.code}):[/red] {escape(e.message)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
    signers = sorted({s["key_id"] for s in b.signatures} & set(keys))
    stage = "full" if m["stage"] == "full" else f"canary {m['percent']:g}%"
    _say(f"OK {m['release']}: profile {m['profile']}, model {m['model']}, {stage}, expires "
         f"{m['expires']}, signed by {len(signers)} pinned key(s) ({', '.join(signers)}), "
         f"payload sha256 {m['payload_sha256'][:16]}...")


@rollout.command()
def timestamp(
    registry: Path = REGISTRY,
    out_file: Path = typer.Option(..., "--out", help="write the signed freshness statement here"),
    public_key_out: Optional[Path] = typer.Option(None, "--public-key-out", help="also write the timestamp public key devices pin"),
) -> None:
    """Sign a fresh, short-lived statement of each profile's newest full version (TUF's timestamp
    role): serve it beside the bundles, re-make it well before it expires."""
    import json

    from quant.qparams import atomic_write_bytes
    from quant.release import TIMESTAMP_MAGIC

    reg = _registry(registry)
    data = reg.timestamp()
    atomic_write_bytes(out_file, data)
    st = json.loads(data[len(TIMESTAMP_MAGIC):])["statement"]
    _say(f"wrote {out_file}: latest {json.dumps(st['latest'], sort_keys=True)}, expires {st['expires']}")
    if public_key_out is not None:
        atomic_write_bytes(public_key_out, reg.timestamp_public_pem())
        _say(f"wrote {public_key_out} (devices pin it)")
