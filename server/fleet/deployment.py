"""A real Flower 1.42 deployment (SuperLink + SuperNodes) of the fedquant app, as the fleet operator
runs it: the fleet's state file, certificates and keys, the SuperLink, the ``flwr`` CLI, SuperNodes,
the staged app and its runs. ``fedquant fleet`` (server.fleet.commands) is the command over it.

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
  format (server.fleet.pki). A node whose key is not registered exits with code 305 ("Failed to
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
stopped by the PIDs recorded here (their process group, then any descendant left), never by name
(server.fleet.processes).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from server.fleet import pki
from server.fleet.processes import (FleetError, descendants, flower_bin, flower_env, free_port, runs_program,
                                    start_process, stop_pids, wait_for_log)

ROOT = Path(__file__).resolve().parents[2]          # server/fleet/deployment.py -> the project
CONNECTION = "fedquant-fleet"
STATE = "state.json"
APP_PACKAGES = ("quant", "client", "server", "simulation")   # staged: the run's setup lives in simulation
EXIT_NOT_ACTIVATED = 305          # flower-supernode: "Failed to activate SuperNode"


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
    return register_all(d, {name: public_key})[name]


def register_all(d: Path, public_keys: dict) -> dict[str, int]:
    """``register`` of several nodes (name -> public key file), the ``flwr`` calls side by side
    (each one is a Python start-up: seconds on a small machine); their node ids."""
    from concurrent.futures import ThreadPoolExecutor

    keys = {name: Path(k).resolve() for name, k in public_keys.items()}
    for k in keys.values():
        pki.load_node_public_key(k)          # a clear error before flwr's
    with ThreadPoolExecutor(max_workers=min(8, len(keys) or 1)) as ex:
        procs = {name: ex.submit(flwr, d, "supernode", "register", str(k), CONNECTION, "--name", name,
                                 "--format", "json") for name, k in keys.items()}
        docs = {name: _json_out(f.result(), f"flwr supernode register {keys[name]}") for name, f in procs.items()}
    state = load_state(d)
    for name, doc in docs.items():
        state["registered"][name] = {"node-id": int(doc["node-id"]), "public-key": str(keys[name]),
                                     "fingerprint": pki.public_key_fingerprint(keys[name])}
    save_state(d, state)
    return {name: int(doc["node-id"]) for name, doc in docs.items()}


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
    """The run's starting QParams and device directory, made before the SuperNodes start so their
    ClientApps find it; returns the device directory. The setup function is the one the app's run
    config names (``setup`` in pyproject.toml's ``[tool.flwr.app.config]``), called as the
    ServerApp calls it: the server side never imports the simulation."""
    import tomllib

    from server.app import load_setup    # here, not at the top: server.app loads flwr

    pyproject = ROOT / "pyproject.toml"
    spec = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"].get("setup")
    if not spec:
        raise FleetError(f"{pyproject}: no `setup` in [tool.flwr.app.config] (the run's setup, \"module:function\")")
    out = Path(out).resolve()
    with contextlib.redirect_stdout(sys.stderr):     # its progress; stdout is what the command reports
        run = load_setup(spec)({"config": str(Path(config).resolve()), "out": str(out),
                                "device-dir": str(out / "device")})
    return Path(run.device_dir).resolve()


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


def _with_clientapp(pyproject: str, clientapp: str) -> str:
    """pyproject.toml text whose ``[tool.flwr.app.components]`` names ``clientapp``."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", clientapp):
        raise ValueError(f"clientapp {clientapp!r}: expected 'module:attribute'")
    out, section, done = [], "", False
    for line in pyproject.splitlines(keepends=True):
        m = re.match(r"\s*\[+([^\]]+)\]+", line)
        if m:
            section = m.group(1).strip()
        elif section == "tool.flwr.app.components" and re.match(r"\s*clientapp\s*=", line):
            line, done = f"clientapp = {_toml_str(clientapp)}\n", True
        out.append(line)
    if not done:
        raise FleetError("pyproject.toml has no clientapp in [tool.flwr.app.components]")
    return "".join(out)


def stage_app(d: Path, clientapp: Optional[str] = None) -> Path:
    """Copy the Flower app (the Python packages, configs, a pyproject.toml without federations)
    into ``<fleet>/app/fedquant``: what ``flwr run`` bundles into the FAB (py/toml/json only).
    ``clientapp`` ("module:attribute", default the project's ``client.app:app``) stages another
    ClientApp of the same packages: the fault tests' ``simulation.faults:hostile_app``."""
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
    pyproject = _strip_federations((ROOT / "pyproject.toml").read_text())
    (app / "pyproject.toml").write_text(_with_clientapp(pyproject, clientapp) if clientapp else pyproject)
    return app


def _toml_str(s: str) -> str:
    return json.dumps(str(s))         # a JSON string is a TOML basic string


def submit_run(d: Path, config: Path, out: Path, device_dir: Path, clientapp: Optional[str] = None) -> int:
    """``flwr run`` of the staged app on the fleet's SuperLink; the run id. An ``out`` that holds
    a checkpoint is resumed (server.strategy). ``clientapp``: see ``stage_app``."""
    d = Path(d).resolve()
    app = stage_app(d, clientapp)
    overrides = {"config": Path(config).resolve(), "out": Path(out).resolve(), "device-dir": Path(device_dir).resolve()}
    args = ["run", str(app), CONNECTION]
    for k, v in overrides.items():
        args += ["--run-config", f"{k}={_toml_str(v)}"]
    doc = _json_out(flwr(d, *args, "--format", "json"), "flwr run")
    run_id = int(doc["run-id"])
    state = load_state(d)
    state["runs"].append({"run-id": run_id, **{k: str(v) for k, v in overrides.items()},
                          **({"clientapp": clientapp} if clientapp else {})})
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


def stop_run(d: Path, run_id: int) -> None:
    """``flwr stop``: the SuperLink marks the run stopped (its ServerApp, if any, is told to end)."""
    _json_out(flwr(d, "stop", str(run_id), CONNECTION, "--format", "json"), f"flwr stop {run_id}")


def serverapp_pids(d: Path) -> list[int]:
    """PIDs of the ``flwr-serverapp`` processes the fleet's SuperLink runs (one per running run):
    found among the SuperLink's descendants, so only processes this fleet started."""
    sl = load_state(d).get("superlink") or {}
    if not runs_program(sl.get("pid"), "flower-superlink"):
        return []
    return [p for p in descendants(sl["pid"]) if runs_program(p, "flwr-serverapp")]


def run_log(d: Path, run_id: int) -> str:
    p = flwr(d, "log", str(run_id), CONNECTION, "--show", timeout=60)
    return p.stdout + p.stderr


def stop_fleet(d: Path, names=None) -> list[str]:
    """Stop the recorded SuperNodes (``names``, or all) and, when no names are given, the
    SuperLink: by their PIDs, all at once (``stop_pids``). Returns what was running."""
    d = Path(d).resolve()
    state = load_state(d)
    targets = {f"supernode {name}": rec.get("pid") for name, rec in state["supernodes"].items()
               if (names is None or name in names) and runs_program(rec.get("pid"), "flower-supernode")}
    sl = state.get("superlink") or {}
    if names is None and runs_program(sl.get("pid"), "flower-superlink"):
        targets["superlink"] = sl["pid"]
    stopped = set(stop_pids(targets.values()))
    return [what for what, pid in targets.items() if pid in stopped]


def running(d: Path) -> dict[str, int]:
    """The recorded processes that still run (name -> pid)."""
    state = load_state(d)
    out = {f"supernode {n}": r["pid"] for n, r in state["supernodes"].items()
           if runs_program(r.get("pid"), "flower-supernode")}
    if state.get("superlink") and runs_program(state["superlink"]["pid"], "flower-superlink"):
        out["superlink"] = state["superlink"]["pid"]
    return out


def up(d: Path, config: Path, out: Path, nodes: Optional[int] = None, hosts=pki.DEFAULT_HOSTS,
       port: int = 0, node_extra: Optional[dict] = None) -> dict:
    """Everything for a run on one machine: certificates, a key per node, the SuperLink, the
    keys registered, the device directory, and one SuperNode per node of the device directory
    (``partition-id`` and ``profile`` in its node config, plus ``node_extra[partition id]``:
    the fault tests' ``fault = "exit"`` and the like, simulation.faults)."""
    d = Path(d).resolve()
    device_dir = prepare_run(config, out)
    fleet = json.loads((device_dir / "fleet.json").read_text())
    pids = sorted(fleet["nodes"], key=lambda p: (0, int(p)) if p.isdigit() else (1, p))
    pids = pids[:nodes] if nodes else pids
    make_certs(d, hosts)
    keys = make_keys(d, [f"node-{p}" for p in pids])
    start_superlink(d, hosts[0] if hosts else "127.0.0.1", port)
    recs, known = {}, load_state(d)["registered"]
    # the SQLite state keeps registrations across SuperLink restarts
    register_all(d, {f"node-{p}": keys[f"node-{p}"].public for p in pids
                     if known.get(f"node-{p}", {}).get("fingerprint")
                     != pki.public_key_fingerprint(keys[f"node-{p}"].public)})
    for p in pids:           # all started, then awaited: they connect in parallel
        nc = {"partition-id": int(p) if p.isdigit() else p, "profile": fleet["nodes"][p]["profile"],
              **(node_extra or {}).get(str(p), {})}
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

