"""The fleet's mixed-precision plan (issue 19, goal 4): the FIT estimate of the plan job
(client/plan.py, quant/mixed.py), its additivity and robust merge, the plan under the budget, the
reply's validation, devices rebuilding their graph for a plan's specs, and the config's checks."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.plan import plan_sensitivity
from quant.affine import range_to_qparams, tensor_range
from quant.instrument import QuantConfig, capture_inputs, get_qparams, quant_points, quantize_, set_qparams
from quant.mixed import MixedBudget, plan_mixed_precision, robust_sensitivity
from quant.qparams import PointParams, qparams_problems
from quant.spec import activation_spec, weight_spec
from quant.wire import Instruction, PlanReply, encode_plan_reply
from server.rounds import plan_keys, planned_qparams
from server.validate import Rejection, validate_plan_reply
from simulation.models import tiny_llama

torch.set_num_threads(1)
A8 = activation_spec(8)
W4 = weight_spec(4, group_size=32, symmetric=False)      # the mixed profile's kind: uint4 groups


def _seqs(n=16, t=32, seed=1):
    return torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(seed))


def _instrumented(seqs, clip=0.5):
    """The tiny Llama at the mixed profile's specs, activation ranges min-max over ``seqs`` x
    ``clip`` (a real clipping error to measure)."""
    model = tiny_llama(seed=0)
    model.eval()
    quantize_(model, QuantConfig(activation=A8, weight=W4))
    points = quant_points(model)
    akeys = sorted(k for k, q in points.items() if q.kind == "activations")
    lo, hi = dict.fromkeys(akeys, np.inf), dict.fromkeys(akeys, -np.inf)

    def track(k, x):
        lo[k], hi[k] = min(lo[k], float(x.min())), max(hi[k], float(x.max()))

    for q in points.values():
        q.mode = "float"
    with torch.no_grad(), capture_inputs(model, track, akeys):
        model(seqs)
    qp = get_qparams(model)
    for k in akeys:
        qp.points[k] = PointParams(A8, *range_to_qparams(lo[k] * clip, hi[k] * clip, A8))
    set_qparams(model, qp)
    return model, qp


@pytest.fixture(scope="module")
def setup():
    seqs = _seqs()
    model, qp = _instrumented(seqs)
    ins = Instruction(0, "plan", qp, keys=tuple(plan_keys(qp)))
    reply, metrics = plan_sensitivity(model, qp, ins, seqs.numpy(), A8, W4)
    return dict(seqs=seqs, model=model, qp=qp, ins=ins, reply=reply, metrics=metrics)


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_fit_ranks_points_as_the_brute_force_loss_increase(setup):
    """Each point alone at its low spec (the rest float), the loss measured over the same text:
    the KL to the float model's predictions (what FIT's Fisher quadratic estimates) and the absolute
    change of the next-token loss (on a random-init model its first-order term, not the second-order
    one, sets the sign). Measured here: Spearman 0.985 (KL) and 0.889 (|dCE|) over the 30 points."""
    model, seqs, reply = setup["model"], setup["seqs"], setup["reply"]
    points = quant_points(model)
    keys = list(setup["ins"].keys)
    saved = {k: (q.mode, q.spec, q.scale.clone(), q.zero_point.clone()) for k, q in points.items()}

    def logits():
        with torch.no_grad():
            return model(seqs).logits.float()

    for q in points.values():
        q.mode = "float"
    ref = logits()
    logp_ref = F.log_softmax(ref, -1).reshape(-1, ref.shape[-1])
    ce = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), seqs[:, 1:].reshape(-1))

    def measure():
        lg = logits()
        kl = F.kl_div(F.log_softmax(lg, -1).reshape(-1, lg.shape[-1]), logp_ref, log_target=True,
                      reduction="batchmean")
        return float(kl), float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), seqs[:, 1:].reshape(-1)) - ce)

    kl, dce = {}, {}
    try:
        for k in keys:
            q = points[k]
            if q.kind == "activations":
                q.mode = "quant"
                kl[k], dce[k] = measure()
            else:           # the weight at 4 bits against the weight at 8 bits
                w = model.get_submodule(k.rsplit(":", 1)[0]).effective_weight()
                got = []
                for spec in (W4, weight_spec(8)):
                    q.set_qparams(*range_to_qparams(*tensor_range(w, spec), spec), spec)
                    q.mode = "quant"
                    got.append(measure())
                    q.mode = "float"
                kl[k], dce[k] = got[0][0] - got[1][0], got[0][1] - got[1][1]
            q.mode = "float"
    finally:
        for k, (mode, spec, s, z) in saved.items():
            points[k].spec, points[k].scale, points[k].zero_point, points[k].mode = spec, s, z, mode
    fit = [reply.sens[k] for k in keys]
    assert _spearman(fit, [kl[k] for k in keys]) > 0.95
    assert _spearman(fit, [abs(dce[k]) for k in keys]) > 0.8
    assert all(v >= 0 for v in fit) and max(fit) > 0


def test_sums_are_additive_and_the_model_is_left_as_it_was(setup):
    """Two half-fleets' sums are the whole fleet's (federated == centralized); the job restores
    the points' modes and qparams and every parameter's requires_grad."""
    model, qp, ins, seqs = setup["model"], setup["qp"], setup["ins"], setup["seqs"]
    modes = {k: q.mode for k, q in quant_points(model).items()}
    before = get_qparams(model)
    flags = [p.requires_grad for p in model.parameters()]
    halves = [plan_sensitivity(model, qp, ins, part.numpy(), A8, W4)[0] for part in (seqs[:7], seqs[7:])]
    whole = setup["reply"]
    for k in ins.keys:
        assert halves[0].sens[k] + halves[1].sens[k] == pytest.approx(whole.sens[k], rel=1e-9, abs=1e-300)
    assert halves[0].tokens + halves[1].tokens == whole.tokens == 16 * 31
    assert halves[0].sequences + halves[1].sequences == whole.sequences == 16
    assert {k: q.mode for k, q in quant_points(model).items()} == modes
    after = get_qparams(model)
    assert all(np.array_equal(after.points[k].scale, p.scale) for k, p in before.points.items())
    assert [p.requires_grad for p in model.parameters()] == flags and any(flags)
    with pytest.raises(ValueError, match="does not have"):
        plan_sensitivity(model, qp, Instruction(0, "plan", qp, keys=("nope:input",)), seqs.numpy(), A8, W4)


def test_the_fleets_importance_does_not_change_the_plan_job_and_is_not_applied(setup):
    """The plan job runs every point in float mode and measures a weight's delta at min-max, so the
    importance (which only ranges weight points, by a search per row) is skipped: the same sums with and without it, and after the job no Linear holds it;
    a later load applies it again."""
    from quant.instrument import _quant_linears

    model, qp, ins, seqs = setup["model"], setup["qp"], setup["ins"], setup["seqs"]
    rng = np.random.default_rng(3)
    paths = sorted(_quant_linears(model))
    ranked = copy.deepcopy(qp)
    ranked.points = {k: p for k, p in qp.points.items() if not k.endswith(":weight")}   # as an instruction
    ranked.importance = {p: rng.random(_quant_linears(model)[p].in_features).astype(np.float32) + 0.1
                         for p in paths}
    set_qparams(model, ranked)                 # an earlier job ranged the weights
    ranged = get_qparams(model)
    assert any(not np.array_equal(ranged.points[k].scale, qp.points[k].scale)
               for k in qp.points if k.endswith(":weight"))
    reply, _ = plan_sensitivity(model, ranked, Instruction(0, "plan", ranked, keys=ins.keys), seqs.numpy(), A8, W4)
    assert reply.sens == setup["reply"].sens
    assert all(m.importance is None for m in _quant_linears(model).values())
    after = get_qparams(model)                 # min-max weights again
    assert all(np.array_equal(after.points[k].scale, p.scale) for k, p in qp.points.items() if k.endswith(":weight"))
    set_qparams(model, ranked)
    assert all(np.array_equal(get_qparams(model).points[k].scale, p.scale) for k, p in ranged.points.items())
    set_qparams(model, qp)


def test_one_lying_phone_cannot_lift_a_point():
    """Honest clients find ``a`` and ``b`` sensitive; one liar claims ``z`` by 10^30. Summed, the
    liar picks the one int16 slot; as shares with the trimmed mean (trim 0.25 of 6: one per side
    dropped) it cannot."""
    rng = np.random.default_rng(0)
    honest = [{"a:input": 5 + rng.random(), "b:input": 3 + rng.random(), "z:input": 0.01 * rng.random(),
               "c:input": 1.0} for _ in range(5)]
    liar = {"a:input": 0.0, "b:input": 0.0, "z:input": 1e30, "c:input": 0.0}
    budget = MixedBudget(max_act16_share=0.25)          # one of the four points
    summed = {k: sum(r[k] for r in honest + [liar]) for k in liar}
    robust = robust_sensitivity(honest + [liar], 0.25)

    def lifted(sens):
        return sorted(k for k, s in plan_mixed_precision({}, sens, {}, budget).items() if s.bits == 16)

    assert lifted(summed) == ["z:input"]
    assert lifted(robust) == ["a:input"]
    assert robust["z:input"] < 0.01
    with pytest.raises(ValueError, match="trim"):
        robust_sensitivity(honest, 0.5)


def test_plan_keeps_the_budget_and_makes_loadable_qparams(setup):
    """The server's plan of the measured sums: average weight bits and the int16 share within the
    budget, int8 per-channel weights and int16 activations where it lifted, version + 1, the plan in
    the metadata; a device without ``respec`` refuses it, the commit check with it accepts it."""
    qp, reply = setup["qp"], setup["reply"]
    model = setup["model"]
    weights = {p: model.get_submodule(p).linear.weight.detach().numpy() for p in
               {k.rsplit(":", 1)[0] for k in qp.points if k.endswith(":weight")}}
    budget = MixedBudget(avg_weight_bits=5.0, weight_group_size=32, max_act16_share=0.2)
    new, report = planned_qparams(qp, reply.sens, budget, weights)
    akeys = [k for k in qp.points if not k.endswith(":weight")]
    assert 4.0 < report["avg_weight_bits"] <= 5.0
    assert 0 < len(report["act16"]) <= int(0.2 * len(akeys))
    assert new.version == qp.version + 1 and json.loads(new.meta["plan"]) == {
        "weights8": report["weights8"], "act16": report["act16"]}
    for k in report["weights8"]:
        assert new.points[k].spec == weight_spec(8) and new.points[k].scale.shape == (weights[k.rsplit(":", 1)[0]].shape[0],)
    for k in report["act16"]:
        assert new.points[k].spec == activation_spec(16)
    untouched = set(qp.points) - set(report["weights8"]) - set(report["act16"])
    assert all(new.points[k] is qp.points[k] for k in untouched)
    assert any("spec" in e for e in qparams_problems(new, qp))
    assert qparams_problems(new, qp, respec=True) == []
    ranked = sorted(akeys, key=lambda k: -reply.sens[k])
    assert set(report["act16"]) == set(ranked[:len(report["act16"])])


@pytest.mark.parametrize("case, code", [
    ("nan", "nan"), ("negative", "negative"), ("short", "shape"), ("huge", "value_range"),
    ("sequences", "count_mismatch"), ("no_tokens", "count_mismatch"), ("kind", "wrong_kind")])
def test_hostile_plan_replies_are_rejected_with_their_code(setup, case, code):
    ins = setup["ins"]
    sens = {k: 1.0 for k in ins.keys}
    tokens, seqs = 124, 4
    if case == "nan":
        sens[ins.keys[3]] = float("nan")
    if case == "negative":
        sens[ins.keys[0]] = -1e-3
    if case == "huge":
        sens[ins.keys[0]] = 1e300
    if case == "no_tokens":
        tokens = 0
    flat, header = encode_plan_reply(PlanReply(sens, tokens, seqs), ins)
    if case == "short":
        flat = {"float64": flat["float64"][:-1], "int64": flat["int64"]}
    if case == "kind":
        header = {**header, "kind": "lsq"}
    r = validate_plan_reply(flat, header, ins, 5 if case == "sequences" else seqs)
    assert isinstance(r, Rejection) and r.code == code, r
    ok = validate_plan_reply(*encode_plan_reply(PlanReply({k: 1.0 for k in ins.keys}, 124, 4), ins), ins, 4)
    assert isinstance(ok, PlanReply) and ok.sens == {k: 1.0 for k in ins.keys}


def test_a_device_rebuilds_its_graph_for_a_plan(setup, tmp_path):
    """A runtime installed at the profile's specs, patched with a plan's QParams (a weight to 8 bits,
    lm_head among them, so the tied embedding follows it; activations to int16), computes the logits
    of a runtime installed with those QParams directly; patched back, those of the original. A
    partial patch (a round's movable points) rebuilds too."""
    from client.runtime import DeviceRuntime, save_device_bundle
    from quant.export import export_float_onnx, float_linears

    float_model = tiny_llama(seed=0)
    export_float_onnx(float_model, tmp_path / "float.onnx")
    qp = copy.copy(setup["qp"])
    qp.model = ""       # the bundle's QParams of a float model carry no fingerprint
    sens = dict(setup["reply"].sens)
    sens["lm_head:weight"] = 1e9          # make sure the tied head is promoted
    weights = {p: w for p, (w, _) in float_linears(float_model).items()}
    planned, report = planned_qparams(qp, sens, MixedBudget(avg_weight_bits=6.0, weight_group_size=32,
                                                            max_act16_share=0.2), weights)
    assert "lm_head:weight" in report["weights8"] and report["act16"]
    save_device_bundle(float_model, qp, tmp_path / "base.onnx", float_onnx=tmp_path / "float.onnx")
    save_device_bundle(float_model, planned, tmp_path / "planned.onnx", float_onnx=tmp_path / "float.onnx")
    ids = _seqs(3, 24, seed=9).numpy()
    rt = DeviceRuntime(tmp_path / "base.onnx", threads=1)
    base = rt.logits(ids)
    direct = DeviceRuntime(tmp_path / "planned.onnx", threads=1).logits(ids)
    assert not np.allclose(base, direct)
    movable = copy.copy(planned)
    movable.points = {k: p for k, p in planned.points.items()
                      if not k.endswith(":weight") or k in report["weights8"]}
    timing = rt.patch(movable)
    assert timing.get("rebuilt") == 1 and rt.qparams.version == planned.version
    np.testing.assert_array_equal(rt.logits(ids), direct)
    back = copy.copy(qp)
    back.version = planned.version + 1
    rt.patch(back)
    np.testing.assert_array_equal(rt.logits(ids), base)
    bad = copy.copy(planned)
    k = report["act16"][0]
    bad.points = {k: PointParams(activation_spec(16), np.ones(3, np.float32), np.zeros(3, np.int16))}
    bad.version = back.version + 1
    from client.runtime import PatchRefused
    with pytest.raises(PatchRefused, match="scale"):
        rt.patch(bad)
    np.testing.assert_array_equal(rt.logits(ids), base)


def _sim_config(plans, fleet_extra="", schedule=None, **server):
    import tomllib
    from pathlib import Path

    from simulation.config import SimulationConfig

    base = tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "plan-smoke.toml").read_text())
    base["server"]["plans"] = plans
    if schedule is not None:
        base["server"]["schedule"] = schedule
    base["server"].update(server)
    if fleet_extra:
        base["fleet"] = fleet_extra
    return SimulationConfig.model_validate(base)


@pytest.mark.parametrize("change, match", [
    (dict(plans={}), "a plan round needs plans"),
    (dict(schedule=[{"job": "scout"}, {"job": "stats"}]), "no plan round"),
    (dict(schedule=[{"job": "scout"}, {"job": "stats"}, {"job": "plan", "repeat": 2}]), "one plan round"),
    (dict(schedule=[{"job": "scout"}, {"job": "plan"}, {"job": "stats"}]), "statistics round before it"),
    (dict(fleet_extra=[{"profile": "int8"}, {"profile": "mixed", "overrides": {
        "lm_head:weight": {"bits": 8, "granularity": "per_channel", "axis": 0}}}]), "hand-written overrides"),
    (dict(plans={"int8": {"avg_weight_bits": 6.0}}, fleet_extra=[{"profile": "int8"}, {"profile": "mixed"}]),
     "int16_activations = false"),
    (dict(plans={"int8": {"avg_weight_bits": 6.0, "max_act16_share": 0.0}},
          fleet_extra=[{"profile": "int8"}, {"profile": "mixed"}]), "a plan promotes 4-bit weights"),
    (dict(plans={"int8-litert": {"avg_weight_bits": 6.0}}, fleet_extra=[{"profile": "int8-litert"}, {"profile": "mixed"}],
          smoothing={"alpha": 0.5, "skip_profiles": ["int8-litert"]}), "only ONNX Runtime profiles take a plan"),
    (dict(plans={"nope": {}}), "no fleet profile named"),
    (dict(schedule=[{"job": "scout"}, {"job": "stats"}, {"job": "plan"}, {"job": "lsq", "profiles": ["nope"]}]),
     r"server.schedule\[3\].profiles: no fleet profile named \['nope'\]"),
])
def test_config_refuses_plans_it_cannot_run(change, match):
    kw = dict(change)
    plans = kw.pop("plans", {"mixed": {"avg_weight_bits": 5.0, "weight_group_size": 64, "max_act16_share": 0.2}})
    with pytest.raises(ValueError, match=match):
        _sim_config(plans, **kw)
    assert _sim_config({"mixed": {"avg_weight_bits": 5.0}}).server.plans["mixed"].avg_weight_bits == 5.0


def test_the_digest_ignores_no_plans_and_the_preparation_ignores_plans():
    """A config without plans keeps its checkpoint digest (``plans`` is left out when empty); the
    preparation's digest leaves plans out (a plan is chosen in the run, nothing is prepared for it)."""
    from server.config import ServerConfig
    from simulation.prepare import config_digest

    plain = ServerConfig(schedule=[{"job": "scout"}, {"job": "stats"}])
    assert "plans" not in json.dumps(plain.model_dump(mode="json", exclude={"plans"}))
    with_plan = _sim_config({"mixed": {"avg_weight_bits": 5.0}})
    other = _sim_config({"mixed": {"avg_weight_bits": 6.0}})
    assert config_digest(with_plan) == config_digest(other)
    assert with_plan.server.digest() != other.server.digest()


def test_a_plan_round_through_flowers_simulation_engine(tmp_path):
    """configs/plan-smoke.toml end to end on Flower's simulation engine: the mixed clients (only
    them) answer the plan round, the server plans, the later rounds' devices rebuild and every reply
    stays valid, the exported model has the plan's int16 points, and the run records the plan
    (plan.json, summary.json beside the centralized plan from the pooled text, the QParams' meta)."""
    from pathlib import Path

    import onnx

    from quant.qparams import load_qparams
    from test_simulate import simulate

    out = tmp_path / "plan-smoke"
    simulate(out, config=Path(__file__).resolve().parents[1] / "configs" / "plan-smoke.toml")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    plan_round = next(m for m in lines if m["job"] == "plan")
    assert plan_round["applied"] and set(plan_round["plan"]) == {"mixed"}
    plan = json.loads((out / "plan.json").read_text())["mixed"]
    assert plan_round["sampled"] == plan["clients"] == 3          # the mixed half of the 6 clients
    assert plan["act16"] and plan["weights8"] and plan["avg_weight_bits"] <= 5.0
    after = [m for m in lines if m["round"] > plan_round["round"]]
    assert all(m["rejections"] == {} for m in after) and any(m["job"] == "lsq" and m["applied"] for m in after)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["profiles"]["mixed"]["plan"]
    assert s["act16"] == plan["act16"] and "centralized_act16" in s["centralized_overlap"]
    qp = load_qparams(out / "qparams" / "mixed.safetensors")
    assert json.loads(qp.meta["plan"]) == {"weights8": plan["weights8"], "act16": plan["act16"]}
    assert all(qp.points[k].spec.bits == 16 for k in plan["act16"])
    g = onnx.load(str(out / "export" / "mixed" / "model.onnx"), load_external_data=False).graph
    int16 = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.INT16}
    for k in plan["act16"]:
        path = k.rsplit(":", 1)[0]
        assert any(n.startswith(path + ".") for n in int16), k
    names = json.loads((out / "export" / "mixed" / "model.names.json").read_text())   # the rebuilt graph's map
    inits = {t.name for t in g.initializer}
    assert names and set(names) <= inits
    assert {names[n][0] for n in int16 if n in names} >= set(plan["act16"])
    assert "plan" not in summary["profiles"]["int8"]


def test_a_release_with_a_plan_installs_and_falls_back(setup, tmp_path):
    """The rollout path (client/updates.py over quant/release.py): a signed release whose QParams
    carry a plan's specs rebuilds the device's graph; falling back to the previous release rebuilds
    it again at the old specs (the plan named the points: a device takes the change both ways)."""
    from datetime import timedelta

    from client.runtime import DeviceRuntime, save_device_bundle
    from client.updates import DeviceReleases
    from quant.export import export_float_onnx, float_linears
    from quant.qparams import save_qparams
    from quant.release import Bundle, generate_key_pair, key_id, load_private_key, make_manifest, sign_manifest
    from test_release import NOW

    float_model = tiny_llama(seed=0)
    export_float_onnx(float_model, tmp_path / "float.onnx")
    qp = copy.copy(setup["qp"])
    qp.model = ""
    weights = {p: w for p, (w, _) in float_linears(float_model).items()}
    planned, report = planned_qparams(qp, setup["reply"].sens, MixedBudget(
        avg_weight_bits=6.0, weight_group_size=32, max_act16_share=0.2), weights)
    save_device_bundle(float_model, qp, tmp_path / "base.onnx", float_onnx=tmp_path / "float.onnx")
    save_device_bundle(float_model, planned, tmp_path / "planned.onnx", float_onnx=tmp_path / "float.onnx")
    ids = _seqs(2, 16, seed=4).numpy()
    rt = DeviceRuntime(tmp_path / "base.onnx", threads=1)
    base, direct = rt.logits(ids), DeviceRuntime(tmp_path / "planned.onnx", threads=1).logits(ids)
    key = load_private_key(generate_key_pair()[0])

    def release(q, version):
        payload = save_qparams(q, tmp_path / f"r{version}.safetensors").read_bytes()
        m = make_manifest(version=version, profile="mixed", model="", payload=payload,
                          created=NOW - timedelta(days=1), expires=NOW + timedelta(days=30), stage="full",
                          percent=100.0)
        return Bundle(m, payload, [sign_manifest(m, key)]).to_bytes()

    dev = DeviceReleases(tmp_path / "dev", {key_id(key): key.public_key()}, 1, "mixed", "", device_id="p")
    dev.apply(release(qp, 1), runtime=rt, now=NOW)
    dev.apply(release(planned, 2), runtime=rt, now=NOW)
    assert rt.last_patch.get("rebuilt") == 1
    np.testing.assert_array_equal(rt.logits(ids), direct)
    dev.fall_back(runtime=rt)
    np.testing.assert_array_equal(rt.logits(ids), base)
