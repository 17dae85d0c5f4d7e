"""`fedquant fleet`: a real Flower 1.42 deployment on 127.0.0.1 -- a SuperLink with TLS, SuperNode
authentication and a SQLite database, SuperNodes with registered keys -- running the fedquant app
(configs/fleet-smoke.toml: 3 nodes, scout + stats) end to end; plus the certificate/key formats
checked with Flower's own loaders."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509

from quant.qparams import load_qparams
from server.fleet import deployment, pki
from server.fleet.processes import FleetError, alive, descendants

ROOT = Path(__file__).resolve().parent.parent
FLEET_SMOKE = ROOT / "configs" / "fleet-smoke.toml"

# flwr's FAB builder uses a pathspec pattern class that pathspec deprecates
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


# ------------------------------------------------------------------------------ fast: formats

def test_node_keys_are_what_flower_parses(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    k = pki.write_node_key(tmp_path, "node-0")
    assert (k.private.stat().st_mode & 0o777) == 0o600
    priv = pki.load_node_private_key(k.private)            # flower-supernode's loader
    registered = try_load_public_key(k.public)              # flwr supernode register's loader
    assert registered == public_key_to_bytes(priv.public_key())
    assert k.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    other = pki.write_node_key(tmp_path, "node-1")
    assert pki.public_key_fingerprint(other.public) != pki.public_key_fingerprint(k.public)
    with pytest.raises(ValueError):
        pki.write_node_key(tmp_path, "../x")


def test_server_certificate_names_its_hosts_and_chains_to_the_ca(tmp_path):
    t = pki.write_tls(tmp_path, ["127.0.0.1", "localhost", "link.example.org"])
    cert = x509.load_pem_x509_certificate(t.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    ca = x509.load_pem_x509_certificate(t.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the pair loads as a TLS server identity, and the CA as a client's trust root
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(t.server_cert, t.server_key)
    ssl.create_default_context(cafile=str(t.ca_cert))
    assert (t.server_key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValueError):
        pki.write_tls(tmp_path / "bad", ["not a host"])


def test_node_config_argument_is_flower_syntax():
    from flwr.common.config import parse_config_args

    arg = deployment.node_config_arg({"partition-id": 2, "profile": "int8", "data-path": "/data/n2.npz"})
    assert parse_config_args([arg]) == {"partition-id": 2, "profile": "int8", "data-path": "/data/n2.npz"}
    with pytest.raises(ValueError):
        deployment.node_config_arg({"data-path": "/a b.npz"})


def test_staged_app_is_a_valid_flower_app_without_federations(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    before = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    app = deployment.stage_app(tmp_path)
    config, _ = load_and_validate(app / "pyproject.toml")
    assert "federations" not in config["tool"]["flwr"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert config["tool"]["flwr"]["app"]["components"] == project["components"]
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "client.app:app"
    assert config["tool"]["flwr"]["app"]["config"] == project["config"]       # the run's setup with it
    assert (app / "client" / "app.py").is_file() and (app / "configs" / "fleet-smoke.toml").is_file()
    assert len(build_fab_from_disk(app)) < 10 * 2**20      # Flower's FAB size limit
    assert hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() == before


def test_prepare_run_calls_the_setup_the_run_config_names(tmp_path, monkeypatch, capsys):
    """The fleet prepares the run with the app's own ``setup`` (pyproject ``[tool.flwr.app.config]``),
    as the ServerApp will, with absolute paths: the server side never imports the simulation."""
    import server.app

    (tmp_path / "pyproject.toml").write_text('[tool.flwr.app.config]\nsetup = "somewhere:setup"\n')
    monkeypatch.setattr(deployment, "ROOT", tmp_path)
    calls = []

    def setup(run_config):
        calls.append(run_config)
        print("preparing")                                   # progress goes to stderr
        return type("Run", (), {"device_dir": Path(run_config["device-dir"])})()

    monkeypatch.setattr(server.app, "load_setup", lambda spec: calls.append(spec) or setup)
    monkeypatch.chdir(tmp_path)
    assert deployment.prepare_run(Path("configs/x.toml"), Path("run")) == tmp_path / "run" / "device"
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == "preparing\n"
    assert calls == ["somewhere:setup", {"config": str(tmp_path / "configs" / "x.toml"), "out": str(tmp_path / "run"),
                                         "device-dir": str(tmp_path / "run" / "device")}]
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config]\n")
    with pytest.raises(FleetError, match="no `setup`"):
        deployment.prepare_run(Path("configs/x.toml"), Path("run"))


# ------------------------------------------------------------------------------ end to end

def _all_pids(d: Path) -> list[int]:
    state = deployment.load_state(d)
    pids = [r["pid"] for r in state["supernodes"].values()]
    if state.get("superlink"):
        pids.append(state["superlink"]["pid"])
    return pids + [k for p in pids for k in descendants(p)]


@pytest.mark.slow
def test_fleet_with_tls_and_node_auth_runs_two_rounds(tmp_path, monkeypatch):
    for k, v in dict(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0",
                     HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1").items():
        monkeypatch.setenv(k, v)
    d, out = tmp_path / "fleet", tmp_path / "run"
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    t0 = time.perf_counter()
    seen: set[int] = set()
    try:
        state = deployment.up(d, FLEET_SMOKE, out)
        seen.update(_all_pids(d))
        sl = state["superlink"]
        assert "Uvicorn running on https://127.0.0.1:" in Path(sl["log"]).read_text()   # TLS
        assert Path(sl["database"]).is_file()                                             # SQLite state
        nodes = state["supernodes"]
        assert sorted(nodes) == ["node-0", "node-1", "node-2"]
        assert [nodes[f"node-{i}"]["node-config"]["partition-id"] for i in range(3)] == [0, 1, 2]
        fleet = json.loads((out / "device" / "fleet.json").read_text())
        assert {n["node-config"]["profile"] for n in nodes.values()} == {"int8", "int16"}
        for i in range(3):
            assert nodes[f"node-{i}"]["node-config"]["profile"] == fleet["nodes"][str(i)]["profile"]
        registered = {r["node-id"] for r in state["registered"].values()}
        assert {n["node-id"] for n in nodes.values()} == registered and len(registered) == 3

        # a SuperNode whose key was never registered is refused and never listed
        intruder = deployment.make_keys(d, ["intruder"])["intruder"]
        rec = deployment.start_supernode(d, "intruder", intruder.private, {"partition-id": 0, "profile": "int8"})
        seen.add(rec["pid"])
        assert rec["status"] == "refused" and not alive(rec["pid"])
        assert "Failed to activate SuperNode" in Path(rec["log"]).read_text()
        listed = deployment.list_supernodes(d)
        assert {int(n["node-id"]) for n in listed} == registered
        assert all(n["status"] == "online" for n in listed)

        run_id = deployment.submit_run(d, FLEET_SMOKE, out, out / "device")
        status = deployment.wait_run(d, run_id, timeout=900)
        assert status == "finished:completed", deployment.run_log(d, run_id)[-4000:]
        seen.update(_all_pids(d))

        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(m["round"], m["job"]) for m in metrics] == [(1, "scout"), (2, "stats")]
        for m in metrics:
            assert m["replies"] == 3 and m["rejections"] == {} and m["applied"] and m["roster"] == 3
        assert metrics[1]["versions"] == {"int8": 1, "int16": 1}
        for p in ("int8", "int16"):
            start = load_qparams(out / "initial" / f"{p}.safetensors")
            final = load_qparams(out / "qparams" / f"{p}.safetensors")
            assert (start.version, final.version) == (0, 1)
            changed = [k for k in final.points if not np.array_equal(final.points[k].scale, start.points[k].scale)]
            assert changed, p
            assert (out / "export" / p / "encodings.json").is_file()
        assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    finally:
        seen.update(_all_pids(d))
        deployment.stop_fleet(d)
        print(f"fleet e2e: {time.perf_counter() - t0:.0f}s")
    assert deployment.running(d) == {}
    deadline = time.monotonic() + 10
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in seen if alive(p)] == []
    assert hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() == pyproject


FLEET_GPTQ = ROOT / "configs" / "fleet-gptq-smoke.toml"


def test_a_gptq_run_gives_the_server_the_float_weights():
    """A hessian round rounds the Linears' float weights, which the server holds only when it is given
    them: a GPTQ run without smoothing or plans once got none (``weights=None``), so every hessian
    round asked no client for anything and was silently left unapplied. The strategy now refuses it."""
    from server.config import ServerConfig
    from server.strategy import FedQuant

    config = ServerConfig(schedule=[{"job": "scout"}, {"job": "hessian"}], gptq={"mixed": {}})
    with pytest.raises(ValueError, match="config.gptq is set: the strategy needs the float weights"):
        FedQuant(config, {}, "unused")


@pytest.mark.slow
def test_fleet_runs_gptq_hessian_rounds(tmp_path, monkeypatch):
    """configs/fleet-gptq-smoke.toml on the deployment engine (TLS, node authentication, 3 SuperNodes:
    one int8 phone, two mixed): scouting, statistics, two hessian rounds (every node sends the upper
    triangles of half of the inputs' second moments; the instructions carry no points), then an
    evaluation. Every hessian round is applied, the mixed profile's final QParams carry GPTQ's codes
    for every 4-bit weight, the last evaluation ran the final version on the nodes, and no node
    refused anything."""
    from client.runtime import load_float_linears, weights_path
    from quant.wire import triangle_size
    from server.rounds import gptq_paths, hessian_request
    from simulation.prepare import load_simulation_config
    from tests.test_faults import ENV, _check_final, _metrics, _stop

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    d, out = tmp_path / "fleet", tmp_path / "run"
    cfg = load_simulation_config(FLEET_GPTQ).server
    t0, seen = time.perf_counter(), set()
    try:
        state = deployment.up(d, FLEET_GPTQ, out)
        assert sorted(r["node-config"]["profile"] for r in state["supernodes"].values()) == ["int8", "mixed", "mixed"]
        run_id = deployment.submit_run(d, FLEET_GPTQ, out, out / "device")
        status = deployment.wait_run(d, run_id, timeout=900)
        seen.update(_all_pids(d))
        assert status == "finished:completed", deployment.run_log(d, run_id)[-4000:]

        rows = _metrics(out)
        assert [(m["round"], m["job"]) for m in rows] == \
            [(1, "scout"), (2, "stats"), (3, "hessian"), (4, "hessian"), (5, "eval")]
        for m in rows:      # every node asked answered; none refused (bad_instruction, patch_refused, ...)
            assert m["replies"] == m["sampled"] == (2 if m["job"] == "eval" else 3), m   # one node has no test text
            assert m["rejections"] == {} and "rejected_clients" not in m, m
        initial = {p: load_qparams(out / "initial" / f"{p}.safetensors") for p in ("int8", "mixed")}
        weights = load_float_linears(weights_path(out / "device" / "mixed" / "model.onnx")).weights()
        paths = gptq_paths(initial, cfg, weights)["mixed"]
        four = sorted(k for k, p in initial["mixed"].points.items() if k.endswith(":weight") and p.spec.bits == 4)
        assert four and sorted(f"{p}:weight" for p in paths) == four

        hess = [m for m in rows if m["job"] == "hessian"]
        for m in hess:
            assert m["applied"] and not m["gptq"]["mixed"]["failed"], m
            # each node sent the whole of its part (float32 upper triangles); the instruction carried no points
            asked = hessian_request(initial, m["round"], cfg, weights)
            assert m["hessians"] == len(asked) and m["bytes_up_per_client"] >= 4 * sum(map(triangle_size, asked.values()))
            assert m["bytes"]["mixed"]["down_per_client"] < rows[1]["bytes"]["mixed"]["down_per_client"] / 2
        assert sum(m["gptq"]["mixed"]["rounded"] for m in hess) == sum(m["hessians"] for m in hess) == len(four)

        versions = _check_final(out)            # committed = exported; the device's own check passes
        final = load_qparams(out / "qparams" / "mixed.safetensors")
        assert sorted(final.codes) == four and not load_qparams(out / "qparams" / "int8.safetensors").codes
        ev = rows[-1]        # after the hessian rounds, the nodes evaluated the final codes
        assert ev["versions"] == versions and ev["versions"]["mixed"] == final.version == hess[-1]["versions"]["mixed"]
        assert ev["eval"]["mixed"]["replies"] == ev["eval"]["int8"]["replies"] == 1
        assert ev["bytes"]["mixed"]["down_per_client"] > 10 * ev["bytes"]["int8"]["down_per_client"]   # the codes
        assert all(np.isfinite(ev["eval"][p]["perplexity"]) for p in ("int8", "mixed"))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 5 and summary["profiles"]["mixed"]["federated_eval"][-1]["round"] == 5
    finally:
        left = _stop(d, seen)
        print(f"fleet gptq e2e: {time.perf_counter() - t0:.0f}s")
    assert left == [] and deployment.running(d) == {}
