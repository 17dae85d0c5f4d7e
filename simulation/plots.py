"""The run's plots (design.md section 8): perplexity per round against the three references, and
the drift of each layer's activation scale over rounds. matplotlib, Agg backend, PNG files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_perplexity(out: Path, summary: dict, metrics: list[dict]) -> Path:
    """One panel per profile: server-side perplexity after each evaluation round, with float,
    random-token calibration and centralized calibration as horizontal references."""
    plt = _plt()
    profiles = summary["profiles"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4), squeeze=False)
    for ax, (p, s) in zip(axes[0], profiles.items()):
        rounds = [m["round"] for m in metrics if (m.get("server_eval") or {}).get(p) is not None]
        ax.plot(rounds, s["federated_ppl"], "o-", color="C0", label="federated")
        for key, style, label in (("float_ppl", ("k", "-"), "float"),
                                  ("random_calib_ppl", ("C3", "--"), "random-token calibration"),
                                  ("centralized_ppl", ("C2", ":"), "centralized (pooled data)")):
            if s.get(key) is not None:
                ax.axhline(s[key], color=style[0], linestyle=style[1], label=f"{label} {s[key]:.2f}")
        ax.set_title(f"{summary['model']} / {p}")
        _integer_rounds(ax)
        ax.set_xlabel("round")
        ax.set_ylabel("perplexity, held-out roles (ORT integer)")
        vals = [v for v in [*s["federated_ppl"], s.get("float_ppl"), s.get("centralized_ppl")] if v]
        if s.get("random_calib_ppl") and vals and s["random_calib_ppl"] > 3 * max(vals):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "perplexity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale_drift(out: Path) -> Path | None:
    """Per profile, each activation point's scale relative to its value at the first recorded
    round (log2), one thin line per point: which layers the fleet's data moved, and when."""
    f = out / "scales.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    plt = _plt()
    profiles = sorted(rows[-1]["profiles"])
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4), squeeze=False)
    for ax, p in zip(axes[0], profiles):
        rs = [r for r in rows if p in r["profiles"]]
        keys = sorted(rs[0]["profiles"][p]["scales"])
        x = [r["round"] for r in rs]
        base = np.array([rs[0]["profiles"][p]["scales"][k] for k in keys])
        ys = np.array([[r["profiles"][p]["scales"].get(k, np.nan) for k in keys] for r in rs])
        drift = np.log2(ys / base)
        for j, k in enumerate(keys):
            ax.plot(x, drift[:, j], lw=0.7, alpha=0.6,
                    color="C3" if "down_proj" in k else "C1" if "attn" in k else "C0")
        ax.set_title(f"{p}: activation scale drift ({len(keys)} points)")
        _integer_rounds(ax)
        ax.set_xlabel("round")
        ax.set_ylabel("log2(scale / scale after first round)")
        ax.grid(alpha=0.3)
        ax.plot([], [], color="C3", label="down_proj inputs")
        ax.plot([], [], color="C1", label="attention")
        ax.plot([], [], color="C0", label="other")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale_drift.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(out: Path, summary: dict) -> list[str]:
    from simulation.report import read_metrics

    paths = [plot_perplexity(out, summary, read_metrics(out)), plot_scale_drift(out)]
    return [str(p) for p in paths if p is not None]
