"""Supervision of the fleet's Flower processes (SuperLink, SuperNodes): start, watch, stop.

Processes bind 127.0.0.1 by default, start in their own session (``start_new_session``) and are
stopped by the PIDs recorded in the fleet's state file (their process group, then any descendant
left), never by name.
"""

from __future__ import annotations

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

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class FleetError(RuntimeError):
    """Something in the fleet did not start or answer; the message says what and where to look."""


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
    """Stop a process this module started, and what it started (``stop_pids``). True if it ran."""
    return bool(stop_pids([pid], grace))


def stop_pids(pids, grace: float = 10.0) -> list[int]:
    """Stop processes this module started, and what they started, all at once: SIGTERM to each
    one's process group (it leads one: ``start_new_session``), SIGKILL to those still running
    after ``grace`` seconds, then any descendant still running (Flower starts SuperExec in a
    session of its own), by PID. Returns the PIDs that ran."""
    running = [p for p in dict.fromkeys(pids) if alive(p)]
    kids = {p: descendants(p) for p in running}

    def send(pid: int, sig) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for p in running:
        send(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in running:
        if alive(p):
            send(p, signal.SIGKILL)
    left = [k for p in running for k in kids[p]]
    deadline = time.monotonic() + 3
    while any(alive(k) for k in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for k in left:
        if alive(k):
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return running


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

