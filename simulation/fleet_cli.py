"""`fedquant fleet`: a real Flower 1.42 deployment (SuperLink + SuperNodes) of the fedquant app.

What Flower 1.42 does (read from its sources and ``--help``; see docs/fleet.md):

- ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTPS on ONE address,
  ``--host``/``--port`` (default 127.0.0.1:8000; the gRPC-rere flags are deprecated). TLS:
  ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``; ``--enable-supernode-auth`` (needs TLS);
  ``--database`` a SQLite file; ``--disable-runtime-dependency-installation`` so the FAB's
  dependencies are never ``uv sync``-ed. It starts its own ``flower-superexec`` (found on PATH),
  which runs the ServerApp of each run in a ``flwr-serverapp`` process.
- SuperNode authentication: the SuperLink learns a node's public key from ``flwr supernode
  register <key.pub> <connection>`` (Control API); a node then starts with
  ``flower-supernode --auth-supernode-private-key <key>``. Keys are EC on a NIST curve, OpenSSH
  format (simulation.pki). A node whose key is not registered exits with code 305 ("Failed to
  activate SuperNode") and never appears in ``flwr supernode list``. Registrations are kept in the
  SQLite ``--database``, so a restarted SuperLink still knows its nodes.
- The ``flwr`` CLI reads its connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``
  ``address``, ``root-certificates``); a fleet directory has its own FLWR_HOME, so ~/.flwr is
  never touched. ``flwr run <app> <connection>`` builds a FAB from the app directory and *migrates*
  (comments out) a ``[tool.flwr.federations]`` section of its pyproject.toml: the app is therefore
  staged into the fleet directory (``app/fedquant``, the Python packages and configs, pyproject
  without the federations) and the project's own pyproject.toml is never given to ``flwr``.
  Every ``flwr`` command runs with the fleet directory as its working directory, with an
  explicit connection name (without one, ``flwr`` would try to migrate ``./pyproject.toml``).

Layout of a fleet directory (default ``runs/fleet``)::

    state.json            PIDs, ports, addresses, registered node ids, runs (this module's state)
    tls/ca.pem server.pem server.key
    keys/<node> <node>.pub
    flwr/config.toml      FLWR_HOME of the flwr CLI (connection "fedquant-fleet")
    superlink/            superlink.log, state.db (SQLite), flwr-home/ (where the ServerApp's FAB goes)
    nodes/<node>/         supernode.log, flwr-home/ (where the ClientApp's FAB goes)
    app/fedquant/         the staged Flower app

Processes bind 127.0.0.1 by default, start in their own session (``start_new_session``) and are
stopped by the PIDs recorded here (their process group, then any descendant left), never by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from simulation import pki

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "fedquant-fleet"
STATE = "state.json"
APP_PACKAGES = ("quant", "client", "server", "simulation")
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
EXIT_NOT_ACTIVATED = 305          # flower-supernode: "Failed to activate SuperNode"


class FleetError(RuntimeError):
    """Something in the fleet did not start or answer; the message says what and where to look."""


# ------------------------------------------------------------------------------ state

def load_state(d: Path) -> dict:
    f = Path(d) / STATE
    if not f.is_file():
        return {"superlink": None, "supernodes": {}, "registered": {}, "runs": []}
    return json.loads(f.read_text())


def save_state(d: Path, state: dict) -> None:
    from quant.qparams import atomic_write_bytes

    Path(d).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(d) / STATE, json.dumps(state, indent=1).encode())


# ------------------------------------------------------------------------------ processes

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower console script of this environment (the venv's, not whatever PATH has first)."""
    p = Path(sys.executable).parent / name
    if p.is_file():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise FleetError(f"{name} not found next to {sys.executable} nor on PATH (is flwr installed?)")
    return found


def flower_env(flwr_home: Path) -> dict:
    """The environment of a Flower process: no telemetry, no update check, no ``uv sync``, its
    own FLWR_HOME, and this environment's bin first on PATH (the SuperLink and SuperNode start
    ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    return env


def start_process(cmd: list[str], log: Path, env: dict, cwd: Path) -> int:
    """Start ``cmd`` in a new session (its own process group), output to ``log``; its PID."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    return proc.pid


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)          # our own child that exited: not a zombie any more
    except ChildProcessError:
        pass


def alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 -- no psutil, or it is gone: kill(0) said it was there
        return True


def descendants(pid: int) -> list[int]:
    """PIDs of the processes ``pid`` started (SuperExec, ServerApp/ClientApp processes)."""
    try:
        import psutil
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 -- no psutil or no process: only the group is stopped
        return []


def runs_program(pid: Optional[int], program: str) -> bool:
    """Is ``pid`` alive and running ``program``? (A PID in an old state file may have been
    reused by an unrelated process since: never signal that one.)"""
    if not alive(pid):
        return False
    try:
        import psutil
        return any(Path(a).name == program for a in psutil.Process(pid).cmdline())
    except ImportError:
        return True
    except Exception:  # noqa: BLE001 -- gone meanwhile
        return False


def stop_pid(pid: Optional[int], grace: float = 10.0) -> bool:
    """Stop a process this module started, and what it started: SIGTERM to its process group
    (it leads one: ``start_new_session``), SIGKILL after ``grace`` seconds, then any descendant
    still running (Flower starts SuperExec in a session of its own), by PID. True if it ran."""
    if not alive(pid):
        return False
    kids = descendants(pid)
    try:
        leads = os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
    send = (lambda s: os.killpg(pid, s)) if leads else (lambda s: os.kill(pid, s))
    try:
        send(signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        try:
            send(signal.SIGKILL)
        except ProcessLookupError:
            pass
    for k in kids:
        deadline = time.monotonic() + 3
        while alive(k) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(k):
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return True


def wait_for_log(log: Path, pattern: str, pid: int, timeout: float) -> Optional[re.Match]:
    """The first match of ``pattern`` in ``log``; None if the process ended first. Raises
    FleetError after ``timeout`` seconds."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.is_file() else ""
        m = rx.search(text)
        if m:
            return m
        if not alive(pid):
            return None
        if time.monotonic() > deadline:
            raise FleetError(f"no {pattern!r} in {log} after {timeout:.0f}s:\n{text[-2000:]}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------ PKI

def make_certs(d: Path, hosts=pki.DEFAULT_HOSTS, force: bool = False) -> pki.TlsFiles:
    tls = Path(d) / "tls"
    files = pki.TlsFiles(tls / "ca.pem", tls / "server.pem", tls / "server.key")
    if all(p.is_file() for p in (files.ca_cert, files.server_cert, files.server_key)) and not force:
        return files
    return pki.write_tls(tls, hosts)


def make_keys(d: Path, names, force: bool = False) -> dict[str, pki.NodeKey]:
    out = {}
    for name in names:
        k = pki.NodeKey(Path(d) / "keys" / name, Path(d) / "keys" / f"{name}.pub")
        out[name] = k if (k.private.is_file() and k.public.is_file() and not force) \
            else pki.write_node_key(Path(d) / "keys", name)
    return out


# ------------------------------------------------------------------------------ SuperLink

def write_flwr_config(d: Path, address: str, ca: Path) -> Path:
    """``<fleet>/flwr/config.toml``: the flwr CLI's connection to this SuperLink (TLS)."""
    import tomli_w

    home = Path(d) / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    doc = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": address, "root-certificates": str(Path(ca).resolve())}}}
    (home / "config.toml").write_text(tomli_w.dumps(doc))
    return home / "config.toml"


def start_superlink(d: Path, host: str = "127.0.0.1", port: int = 0, timeout: float = 60) -> dict:
    """Start the SuperLink (TLS, SuperNode authentication, SQLite state) and wait until it serves."""
    d = Path(d).resolve()
    state = load_state(d)
    if state.get("superlink") and runs_program(state["superlink"]["pid"], "flower-superlink"):
        raise FleetError(f"a SuperLink of {d} already runs (pid {state['superlink']['pid']}); "
                         "`fedquant fleet stop` it first")
    tls = make_certs(d)
    port = port or free_port(host)
    sl = d / "superlink"
    log = sl / "superlink.log"
    log.unlink(missing_ok=True)
    cmd = [flower_bin("flower-superlink"),
           "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
           "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
           "--database", str(sl / "state.db"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    pid = start_process(cmd, log, flower_env(sl / "flwr-home"), cwd=sl)
    address = f"{host}:{port}"
    state["superlink"] = {"pid": pid, "address": address, "log": str(log), "database": str(sl / "state.db"),
                          "ca": str(tls.ca_cert)}
    save_state(d, state)
    if wait_for_log(log, r"Uvicorn running on https://", pid, timeout) is None:
        raise FleetError(f"the SuperLink exited at start; see {log}:\n{log.read_text()[-2000:]}")
    write_flwr_config(d, address, tls.ca_cert)
    return state["superlink"]


# ------------------------------------------------------------------------------ flwr CLI

def flwr(d: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``flwr`` CLI with the fleet's FLWR_HOME, run inside the fleet directory (never in a
    project directory: ``flwr`` migrates the pyproject.toml it finds)."""
    d = Path(d).resolve()
    return subprocess.run([flower_bin("flwr"), *args], cwd=d, env=flower_env(d / "flwr"),
                          capture_output=True, text=True, timeout=timeout)


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed (other lines may come before it)."""
    out = proc.stdout
    i = out.find("{")
    try:
        doc = json.loads(out[i:]) if i >= 0 else None
    except ValueError:
        doc = None
    if proc.returncode != 0 or not isinstance(doc, dict) or not doc.get("success", False):
        raise FleetError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return doc


def register(d: Path, name: str, public_key: Path) -> int:
    """``flwr supernode register``: the SuperLink will accept the node holding this key."""
    pki.load_node_public_key(public_key)          # a clear error before flwr's
    doc = _json_out(flwr(d, "supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                         "--name", name, "--format", "json"), f"flwr supernode register {public_key}")
    node_id = int(doc["node-id"])
    state = load_state(d)
    state["registered"][name] = {"node-id": node_id, "public-key": str(Path(public_key).resolve()),
                                 "fingerprint": pki.public_key_fingerprint(public_key)}
    save_state(d, state)
    return node_id


def list_supernodes(d: Path) -> list[dict]:
    """``flwr supernode list``: node id and status (registered, online, offline, ...) per node."""
    return _json_out(flwr(d, "supernode", "list", CONNECTION, "--format", "json"), "flwr supernode list")["nodes"]


# ------------------------------------------------------------------------------ SuperNodes

def node_config_arg(node_config: dict) -> str:
    """``--node-config`` text: space-separated ``key=value`` with TOML values (strings quoted)."""
    parts = []
    for k, v in node_config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(k)):
            raise ValueError(f"node config key {k!r}: letters, digits, '-' and '_' only")
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"node config {k}: int, float or str, got {type(v).__name__}")
        if isinstance(v, str) and (" " in v or '"' in v):
            raise ValueError(f"node config {k}={v!r}: Flower splits --node-config on spaces")
        parts.append(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}")
    return " ".join(parts)


def launch_supernode(d: Path, name: str, private_key: Path, node_config: dict, superlink: Optional[str] = None,
                     ca: Optional[Path] = None) -> dict:
    """Start a SuperNode with its key and node config (not waiting for it): to the fleet's
    SuperLink, or to ``superlink`` (host:port) trusting ``ca`` (a device joining a remote link)."""
    d = Path(d).resolve()
    state = load_state(d)
    sl = state.get("superlink") or {}
    superlink, ca = superlink or sl.get("address"), ca or sl.get("ca")
    if not superlink or not ca:
        raise FleetError(f"{d}: no SuperLink started here; give the SuperLink's address and CA certificate")
    old = state["supernodes"].get(name)
    if old and runs_program(old["pid"], "flower-supernode"):
        raise FleetError(f"SuperNode {name} already runs (pid {old['pid']})")
    nd = d / "nodes" / name
    log = nd / "supernode.log"
    log.unlink(missing_ok=True)
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--root-certificates", str(Path(ca).resolve()),
           "--auth-supernode-private-key", str(Path(private_key).resolve()),
           "--node-config", node_config_arg(node_config),
           "--host", "127.0.0.1", "--port", str(free_port())]
    pid = start_process(cmd, log, flower_env(nd / "flwr-home"), cwd=nd)
    rec = {"pid": pid, "key": str(Path(private_key).resolve()), "node-config": node_config, "log": str(log),
           "superlink": superlink, "status": "starting"}
    state["supernodes"][name] = rec
    save_state(d, state)
    return rec


def await_supernode(d: Path, name: str, timeout: float = 60) -> dict:
    """Wait until the SuperLink activated the SuperNode (``status`` "online", its ``node-id``)
    or refused it (``status`` "refused": the process exited, e.g. 305 for an unregistered key)."""
    rec = load_state(d)["supernodes"][name]
    m = wait_for_log(Path(rec["log"]), r"SuperNode ID: (\d+)", rec["pid"], timeout)
    rec["status"] = "online" if m else "refused"
    if m:
        rec["node-id"] = int(m.group(1))
    state = load_state(d)
    state["supernodes"][name] = rec
    save_state(d, state)
    return rec


def start_supernode(d: Path, name: str, private_key: Path, node_config: dict, timeout: float = 60, **where) -> dict:
    """``launch_supernode`` then ``await_supernode``."""
    launch_supernode(d, name, private_key, node_config, **where)
    return await_supernode(d, name, timeout)


# ------------------------------------------------------------------------------ the app and the run

def prepare_run(config: Path, out: Path) -> Path:
    """The run's starting QParams and device directory (``simulation.simulate.prepare``), made
    before the SuperNodes start so their ClientApps find it; returns the device directory."""
    from simulation.simulate import load_simulation_config, prepare

    cfg = load_simulation_config(config)
    return prepare(cfg, Path(out).resolve(), progress=lambda m: typer.echo(m, err=True)).device_dir.resolve()


def _strip_federations(pyproject: str) -> str:
    """pyproject.toml text without ``[tool.flwr.federations...]`` tables (what ``flwr run``
    would migrate into FLWR_HOME and comment out) and without the pytest/setuptools tables."""
    out, skip = [], False
    for line in pyproject.splitlines(keepends=True):
        m = re.match(r"\s*\[+([^\]]+)\]+", line)
        if m:
            skip = m.group(1).strip().startswith(("tool.flwr.federations", "tool.pytest", "tool.setuptools",
                                                  "build-system", "project.scripts"))
        if not skip:
            out.append(line)
    return "".join(out)


def stage_app(d: Path) -> Path:
    """Copy the Flower app (the Python packages, configs, a pyproject.toml without federations)
    into ``<fleet>/app/fedquant``: what ``flwr run`` bundles into the FAB (py/toml/json only)."""
    app = Path(d).resolve() / "app" / "fedquant"
    shutil.rmtree(app, ignore_errors=True)
    for pkg in APP_PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" in f.parts:
                continue
            dst = app / f.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    for f in sorted((ROOT / "configs").rglob("*.toml")):
        dst = app / f.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    (app / "pyproject.toml").write_text(_strip_federations((ROOT / "pyproject.toml").read_text()))
    return app


def _toml_str(s: str) -> str:
    return json.dumps(str(s))         # a JSON string is a TOML basic string


def submit_run(d: Path, config: Path, out: Path, device_dir: Path) -> int:
    """``flwr run`` of the staged app on the fleet's SuperLink; the run id."""
    d = Path(d).resolve()
    app = stage_app(d)
    overrides = {"config": Path(config).resolve(), "out": Path(out).resolve(), "device-dir": Path(device_dir).resolve()}
    args = ["run", str(app), CONNECTION]
    for k, v in overrides.items():
        args += ["--run-config", f"{k}={_toml_str(v)}"]
    doc = _json_out(flwr(d, *args, "--format", "json"), "flwr run")
    run_id = int(doc["run-id"])
    state = load_state(d)
    state["runs"].append({"run-id": run_id, **{k: str(v) for k, v in overrides.items()}})
    save_state(d, state)
    return run_id


def run_status(d: Path, run_id: int) -> str:
    """``pending``, ``starting``, ``running`` or ``finished:completed|failed|stopped``."""
    doc = _json_out(flwr(d, "list", CONNECTION, "--run-id", str(run_id), "--format", "json"), "flwr list")
    runs = doc.get("runs") or []
    return str(runs[0]["status"]) if runs else "unknown"


def wait_run(d: Path, run_id: int, timeout: float = 1800, poll: float = 2.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        s = run_status(d, run_id)
        if s.startswith("finished"):
            return s
        if time.monotonic() > deadline:
            raise FleetError(f"run {run_id} is still {s!r} after {timeout:.0f}s (`flwr log {run_id}`)")
        time.sleep(poll)


def run_log(d: Path, run_id: int) -> str:
    p = flwr(d, "log", str(run_id), CONNECTION, "--show", timeout=60)
    return p.stdout + p.stderr


def stop_fleet(d: Path, names=None) -> list[str]:
    """Stop the recorded SuperNodes (``names``, or all) and, when no names are given, the
    SuperLink: by their PIDs. Returns what was running."""
    d = Path(d).resolve()
    state = load_state(d)
    stopped = []
    for name, rec in state["supernodes"].items():
        if (names is None or name in names) and runs_program(rec.get("pid"), "flower-supernode"):
            if stop_pid(rec.get("pid")):
                stopped.append(f"supernode {name}")
    sl = state.get("superlink") or {}
    if names is None and runs_program(sl.get("pid"), "flower-superlink") and stop_pid(sl["pid"]):
        stopped.append("superlink")
    return stopped


def running(d: Path) -> dict[str, int]:
    """The recorded processes that still run (name -> pid)."""
    state = load_state(d)
    out = {f"supernode {n}": r["pid"] for n, r in state["supernodes"].items()
           if runs_program(r.get("pid"), "flower-supernode")}
    if state.get("superlink") and runs_program(state["superlink"]["pid"], "flower-superlink"):
        out["superlink"] = state["superlink"]["pid"]
    return out


def up(d: Path, config: Path, out: Path, nodes: Optional[int] = None, hosts=pki.DEFAULT_HOSTS,
       port: int = 0) -> dict:
    """Everything for a run on one machine: certificates, a key per node, the SuperLink, the
    keys registered, the device directory, and one SuperNode per node of the device directory
    (``partition-id`` and ``profile`` in its node config)."""
    d = Path(d).resolve()
    device_dir = prepare_run(config, out)
    fleet = json.loads((device_dir / "fleet.json").read_text())
    pids = sorted(fleet["nodes"], key=lambda p: (0, int(p)) if p.isdigit() else (1, p))
    pids = pids[:nodes] if nodes else pids
    make_certs(d, hosts)
    keys = make_keys(d, [f"node-{p}" for p in pids])
    start_superlink(d, hosts[0] if hosts else "127.0.0.1", port)
    recs, known = {}, load_state(d)["registered"]
    for p in pids:           # the SQLite state keeps registrations across SuperLink restarts
        k = keys[f"node-{p}"].public
        if known.get(f"node-{p}", {}).get("fingerprint") != pki.public_key_fingerprint(k):
            register(d, f"node-{p}", k)
    for p in pids:           # all started, then awaited: they connect in parallel
        nc = {"partition-id": int(p) if p.isdigit() else p, "profile": fleet["nodes"][p]["profile"]}
        launch_supernode(d, f"node-{p}", keys[f"node-{p}"].private, nc)
    for p in pids:
        recs[f"node-{p}"] = await_supernode(d, f"node-{p}")
    refused = [n for n, r in recs.items() if r["status"] != "online"]
    if refused:
        raise FleetError(f"SuperNodes {refused} were refused; see their logs under {d / 'nodes'}")
    state = load_state(d)
    state["prepared"] = {"config": str(Path(config).resolve()), "out": str(Path(out).resolve()),
                         "device-dir": str(device_dir)}
    save_state(d, state)
    return state


# ------------------------------------------------------------------------------ the typer app

fleet = typer.Typer(help="A Flower deployment: SuperLink (TLS, node auth, SQLite) and SuperNodes; see docs/fleet.md.",
                    no_args_is_help=True)
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
