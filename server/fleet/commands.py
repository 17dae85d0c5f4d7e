"""``fedquant fleet``: the fleet operator's commands over ``server.fleet.deployment`` (docs/fleet.md).

Each command parses its options, calls the deployment and prints what it did; a fleet failure is a red
``error:`` line and exit code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from server.fleet import pki
from server.fleet.deployment import (list_supernodes, load_state, make_certs, make_keys, prepare_run, register,
                                     running, start_superlink, start_supernode, stop_fleet, stop_run, submit_run,
                                     up, wait_run)
from server.fleet.processes import FleetError

fleet = typer.Typer(help="A Flower deployment: SuperLink (TLS, node auth, SQLite) and SuperNodes; see docs/fleet.md.",
                    no_args_is_help=True, pretty_exceptions_show_locals=False)
DirOpt = typer.Option(Path("runs/fleet"), "--dir", help="the fleet directory (state, keys, logs)")


def _fail(e: Exception):
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@fleet.command()
def certs(dir: Path = DirOpt,
          host: list[str] = typer.Option(list(pki.DEFAULT_HOSTS), "--host", help="SAN of the SuperLink's certificate"),
          force: bool = typer.Option(False, help="replace existing certificates")):
    """A CA and the SuperLink's TLS certificate (tls/ca.pem goes to every device)."""
    t = make_certs(dir, host, force)
    typer.echo(f"{t.ca_cert}\n{t.server_cert}\n{t.server_key}")


@fleet.command()
def keys(names: list[str] = typer.Argument(..., help="node names, e.g. node-0 node-1"), dir: Path = DirOpt,
         force: bool = typer.Option(False, help="replace existing keys")):
    """An EC P-384 key pair per SuperNode (keys/<name> to the device, keys/<name>.pub to register)."""
    for n, k in make_keys(dir, names, force).items():
        typer.echo(f"{n}: {k.private} {k.public} ({pki.public_key_fingerprint(k.public)})")


@fleet.command()
def superlink(dir: Path = DirOpt, host: str = typer.Option("127.0.0.1", help="address to bind"),
              port: int = typer.Option(0, help="0: a free port")):
    """Start the SuperLink (TLS + SuperNode authentication + SQLite database)."""
    try:
        sl = start_superlink(dir, host, port)
    except FleetError as e:
        _fail(e)
    typer.echo(f"SuperLink pid {sl['pid']} on https://{sl['address']} (log {sl['log']})")


@fleet.command("register")
def register_cmd(public_keys: list[Path] = typer.Argument(..., help="<name>.pub files"), dir: Path = DirOpt):
    """Register SuperNode public keys with the SuperLink (flwr supernode register)."""
    try:
        for k in public_keys:
            name = k.name[:-4] if k.name.endswith(".pub") else k.stem
            typer.echo(f"{name}: node id {register(dir, name, k)}")
    except (FleetError, ValueError) as e:
        _fail(e)


@fleet.command()
def supernode(name: str, dir: Path = DirOpt,
              key: Optional[Path] = typer.Option(None, help="private key (default keys/<name>)"),
              partition_id: Optional[str] = typer.Option(None, help="the node's entry in the device directory"),
              profile: Optional[str] = typer.Option(None, help="device profile (default: the device directory's)"),
              data_path: Optional[str] = typer.Option(None, help="the node's data (.npz), instead of a partition"),
              superlink: Optional[str] = typer.Option(None, help="host:port of a remote SuperLink (default: this fleet's)"),
              ca: Optional[Path] = typer.Option(None, help="its CA certificate (default: this fleet's tls/ca.pem)")):
    """Start one SuperNode with its key and node config (partition-id / profile / data-path)."""
    nc = {k: v for k, v in {"partition-id": int(partition_id) if partition_id and partition_id.isdigit() else partition_id,
                            "profile": profile, "data-path": data_path}.items() if v is not None}
    try:
        rec = start_supernode(dir, name, key or Path(dir) / "keys" / name, nc, superlink=superlink, ca=ca)
    except (FleetError, ValueError) as e:
        _fail(e)
    if rec["status"] != "online":
        _fail(FleetError(f"SuperNode {name} was refused by the SuperLink (is its key registered?); see {rec['log']}"))
    typer.echo(f"SuperNode {name} pid {rec['pid']} node id {rec['node-id']}")


@fleet.command("prepare")
def prepare_cmd(config: Path = typer.Option(..., help="simulation config TOML"),
                out: Path = typer.Option(..., help="run directory")):
    """Write the run's starting QParams and device directory (before the SuperNodes start)."""
    typer.echo(prepare_run(config, out))


@fleet.command("run")
def run_cmd(dir: Path = DirOpt, config: Optional[Path] = typer.Option(None, help="default: the one `up` prepared"),
            out: Optional[Path] = typer.Option(None), wait: bool = typer.Option(True, help="wait for the end"),
            timeout: float = typer.Option(3600)):
    """Submit the fedquant app to the SuperLink (flwr run) and wait for it to finish."""
    prep = load_state(dir).get("prepared") or {}
    config = config or (Path(prep["config"]) if prep else None)
    out = out or (Path(prep["out"]) if prep else None)
    if config is None or out is None:
        _fail(FleetError("give --config and --out (or run `fedquant fleet up` first)"))
    try:
        device_dir = prep.get("device-dir") if prep.get("out") == str(out.resolve()) else None
        device_dir = Path(device_dir) if device_dir else prepare_run(config, out)
        run_id = submit_run(dir, config, out, device_dir)
        typer.echo(f"run {run_id} submitted")
        if wait:
            status = wait_run(dir, run_id, timeout)
            typer.echo(f"run {run_id}: {status}; results in {out}")
            if status != "finished:completed":
                raise typer.Exit(1)
    except FleetError as e:
        _fail(e)


@fleet.command("stop-run")
def stop_run_cmd(run_id: int = typer.Argument(..., help="the run id `fedquant fleet run` printed"),
                 dir: Path = DirOpt):
    """Stop a run (flwr stop): before resuming one whose ServerApp died, which the SuperLink
    otherwise lists as running for another minute. Resume with `fedquant fleet run` and the same --out."""
    try:
        stop_run(dir, run_id)
    except FleetError as e:
        _fail(e)
    typer.echo(f"run {run_id} stopped")


@fleet.command("up")
def up_cmd(config: Path = typer.Option(Path("configs/fleet-smoke.toml")), dir: Path = DirOpt,
           out: Optional[Path] = typer.Option(None, help="run directory (default <dir>/run)"),
           nodes: Optional[int] = typer.Option(None, help="SuperNodes to start (default: every node of the config)")):
    """Certificates, keys, SuperLink, registration, device directory and SuperNodes, on this machine."""
    try:
        state = up(dir, config, out or Path(dir) / "run", nodes)
    except (FleetError, ValueError) as e:
        stop_fleet(dir)
        _fail(e)
    typer.echo(f"SuperLink https://{state['superlink']['address']}; SuperNodes: "
               + ", ".join(f"{n} (pid {r['pid']})" for n, r in state["supernodes"].items() if r.get("status") == "online"))
    typer.echo(f"next: fedquant fleet run --dir {dir}")


@fleet.command()
def status(dir: Path = DirOpt):
    """What runs (by recorded PID) and what the SuperLink knows about the nodes."""
    r = running(dir)
    for name, pid in r.items():
        typer.echo(f"{name}: pid {pid}")
    if "superlink" in r:
        try:
            for n in list_supernodes(dir):
                typer.echo(f"node {n['node-id']}: {n['status']}")
        except FleetError as e:
            _fail(e)


@fleet.command("stop")
def stop_cmd(names: Optional[list[str]] = typer.Argument(None, help="SuperNodes to stop (default: everything)"),
             dir: Path = DirOpt):
    """Stop SuperNodes (or everything) by their recorded PIDs."""
    for s in stop_fleet(dir, names or None):
        typer.echo(f"stopped {s}")


@fleet.command("down")
def down_cmd(dir: Path = DirOpt):
    """Stop every SuperNode and the SuperLink of the fleet directory."""
    for s in stop_fleet(dir):
        typer.echo(f"stopped {s}")
