"""The ``fedquant`` console command.

A failure prints one line (what failed, where, what to do) and exits non-zero: 2 for a bad config
or path the command checks, 1 for anything unexpected. ``fedquant --debug ...`` or
``FEDQUANT_DEBUG=1`` adds the full traceback (never the locals: they hold whole tensors) and
shows the library warnings that ``simulation.quiet`` otherwise hides.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from typer.core import TyperGroup

from simulation.quiet import quiet_known_warnings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quant", "client", "server", "simulation")
err = Console(stderr=True)


def _debug(ctx: click.Context) -> bool:
    env = os.environ.get("FEDQUANT_DEBUG", "").strip().lower()
    return bool(ctx.params.get("debug")) or env not in ("", "0", "false", "no", "off")


def _where(tb) -> str:
    """``file:line in function`` of the innermost frame in this project's packages (else the
    innermost frame)."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    for f in reversed(frames):
        path = Path(f.filename).resolve()
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES:
            return f"{path.relative_to(ROOT).as_posix()}:{f.lineno} in {f.name}"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"


def _advice(e: BaseException, command: str) -> str:
    if isinstance(e, MemoryError):
        advice = "The machine ran out of memory: try fewer clients (--clients) or a smaller model."
    elif isinstance(e, OSError):
        advice = "Check the path, its permissions and the free disk space."
    else:
        advice = "This is a bug or a state fedquant does not expect."
    if command == "simulate":
        advice += " Started again, the run resumes from its last checkpoint."
    return advice


def crash_message(e: BaseException, command: str, debug: bool) -> str:
    """The one line an unexpected exception becomes."""
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    line = f"fedquant {command} failed: {what} (at {_where(e.__traceback__)}). {_advice(e, command)}"
    if not debug:
        line += " For the full traceback run it again with --debug (or FEDQUANT_DEBUG=1)."
    return " ".join(line.split())       # one line, even if the exception's message has several


class FriendlyGroup(TyperGroup):
    """The root group: whatever a command (of any sub-app) raises becomes one line and exit code
    1; with --debug or FEDQUANT_DEBUG=1 the traceback is printed first."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise                       # typer.Exit, Ctrl-C, usage errors: click reports them
        except Exception as e:
            debug = _debug(ctx)
            if debug:
                print("".join(traceback.format_exception(e)), file=sys.stderr, end="")
            err.print(f"[red]error:[/red] {escape(crash_message(e, ctx.invoked_subcommand or '', debug))}",
                      soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(cls=FriendlyGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_show_locals=False,
                  help="fedquant: federated calibration of quantization parameters.")


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="on an unexpected error show the full traceback; show "
                                                            "every library warning (also: FEDQUANT_DEBUG=1)")) -> None:
    """fedquant: federated calibration of quantization parameters."""
    if not _debug(ctx):
        quiet_known_warnings()


from server.fleet.commands import fleet  # noqa: E402
from server.rollout_commands import rollout  # noqa: E402

app.add_typer(fleet, name="fleet")
app.add_typer(rollout, name="rollout")


def _quiet_env() -> None:
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(k, v)


def _progress(transient: bool) -> Progress:
    """A progress line that fits the terminal (80 columns too): a fixed short bar, and the
    description cut with an ellipsis to what is left."""
    desc = Column(no_wrap=True, overflow="ellipsis", max_width=max(16, err.width - 40))
    return Progress(TextColumn("{task.description}", table_column=desc), BarColumn(bar_width=20),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=transient)


def _progress_factory(progress: Progress):
    @contextlib.contextmanager
    def bar(desc: str, total: int):
        task = progress.add_task(desc, total=total)

        class _Bar:
            def advance(self):
                progress.advance(task)
        try:
            yield _Bar()
        finally:
            progress.remove_task(task)
    return bar


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


@app.command()
def quality(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file of QualityConfig; defaults otherwise"),
    out: Path = typer.Option(Path("runs/quality"), "--out", help="where quality.json and quality.md go"),
    model: Optional[str] = typer.Option(None, help="smollm2, tiny-llama, tiny-qwen2, an HF directory or a .gguf"),
    eval_sequences: Optional[int] = typer.Option(None, help="held-out sequences for perplexity"),
    calib_sequences: Optional[int] = typer.Option(None, help="calibration sequences"),
    seq_len: Optional[int] = typer.Option(None, help="tokens per sequence"),
    threads: int = typer.Option(2, help="torch intra-op threads"),
) -> None:
    """Central calibration quality table: float vs W8A8 (random-token and real-text calibration,
    every calibrator) and W8A16, perplexity on held-out Shakespeare roles."""
    _quiet_env()
    import torch

    from quant.configfile import ConfigError, load_config
    from simulation.quality import QualityConfig, run_quality

    torch.set_num_threads(threads)
    try:
        cfg = load_config(config, QualityConfig, {"model": model, "eval_sequences": eval_sequences,
                                                  "calib_sequences": calib_sequences, "seq_len": seq_len})
    except ConfigError as e:
        _fail(str(e))
    with _progress(transient=True) as progress:
        try:
            result = run_quality(
                cfg, out, progress=_progress_factory(progress),
                on_row=lambda r: progress.console.print(
                    f"{r['recipe']:<24} {r['calibration_data']:<20} PPL {r['ppl']:.2f}", highlight=False))
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
    table = Table(title=f"{cfg.model}: perplexity on {result['eval_tokens']} held-out tokens "
                        f"({result['split']['heldout_roles']} unseen roles)")
    for col in ("recipe", "calibration data", "PPL", "vs float"):
        table.add_column(col, justify="right" if col in ("PPL", "vs float") else "left")
    for r in result["rows"]:
        table.add_row(r["recipe"], r["calibration_data"], f"{r['ppl']:.2f}",
                      "" if r["recipe"] == "float" else f"{r['increase_pct']:+.1f}%")
    Console().print(table)
    err.print(f"wrote {out / 'quality.json'} and {out / 'quality.md'} in {result['wall_s']} s")


@app.command()
def export(
    qparams: Path = typer.Option(..., "--qparams", "-q", help="QParams file (.safetensors) made for this model"),
    model: str = typer.Option("smollm2", help="smollm2, tiny-llama, tiny-qwen2, an HF directory or a .gguf"),
    out: Path = typer.Option(..., "--out", help="directory for the device bundle"),
    format: str = typer.Option("onnx", "--format", help="onnx (ONNX Runtime) or tflite (LiteRT; needs the fedquant[litert] extra)"),
    seq_len: int = typer.Option(128, help="tflite: the fixed number of tokens per sequence"),
    batch: int = typer.Option(1, help="tflite: the fixed batch"),
) -> None:
    """Export a model + QParams to what a phone runs: the ONNX QDQ model with its name map, the
    float graph for statistics, the float weights for re-quantizing, and AIMET/QNN encodings; or,
    with --format tflite, the LiteRT model with the same points (quant.tflite)."""
    _quiet_env()
    from quant.instrument import fingerprint
    from quant.qparams import load_qparams, per_token_linears, rotated_linears
    from simulation.models import load_model

    if format not in ("onnx", "tflite"):
        _fail(f"--format must be onnx or tflite, got {format!r}")
    try:
        m, _ = load_model(model)
        qp = load_qparams(qparams, expect_model=fingerprint(m))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if format == "tflite" and per_token_linears(qp):
        _fail(f"{qparams}: {len(per_token_linears(qp))} Linears take their input per token at run time "
              "(a fleet entry's per_token); the LiteRT export has static per-tensor activations only")
    if format == "tflite" and rotated_linears(qp):
        _fail(f"{qparams}: {len(rotated_linears(qp))} Linears rotate their input (a fleet entry's rotate); "
              "the LiteRT export has no rotation")
    out.mkdir(parents=True, exist_ok=True)
    if format == "tflite":
        _export_tflite(m, qp, out, batch, seq_len)
    else:
        from client.runtime import save_device_bundle
        from quant.encodings import write_encodings_json
        from quant.export import export_float_onnx

        with err.status("exporting the float graph (SmolLM2: a few minutes)"):
            export_float_onnx(m, out / "float.onnx")
        with err.status("writing the QDQ model and the device bundle"):
            save_device_bundle(m, qp, out / "model.qdq.onnx", float_onnx=out / "float.onnx")
            if qp.codes:    # encodings hold ranges: a consumer would round the weights to the nearest
                err.print(f"no encodings.json: the QParams carry GPTQ's codes of {len(qp.codes)} weights, which "
                          "only the QDQ model holds", highlight=False)
            else:
                write_encodings_json(qp, out / "encodings.json")
    for f in sorted(out.iterdir()):
        err.print(f"{f}  {f.stat().st_size / 2**20:.1f} MB", highlight=False)


def _export_tflite(m, qp, out: Path, batch: int, seq_len: int) -> None:
    """``model.tflite`` (the fleet's points, quant.tflite's QDQ form), the float graph it was made
    from (``model.float.tflite``: the same folded constants, no points) and the float weights a
    device re-quantizes from when it patches a release (``model.weights.npz``)."""
    from client.runtime import save_float_linears
    from quant.export import float_linears

    try:
        from quant.tflite import convert_float, quantize_points
    except ImportError as e:
        _fail(str(e))
    try:
        with err.status("converting the float model with litert-torch (SmolLM2: minutes)"):
            weights = convert_float(m, qp, out / "model.float.tflite", batch=batch, seq_len=seq_len)
        with err.status("writing the fleet's points into the .tflite"):
            quantize_points(out / "model.float.tflite", weights, qp, out / "model.tflite")
            save_float_linears(float_linears(m), out / "model.tflite")
    except ImportError as e:
        _fail(str(e))


def _round_line(m: dict, width: int = 80) -> str:
    """One round's summary, wrapped to ``width`` columns between its parts (continuation lines
    indented), so that it fits an 80-column terminal."""
    def glue(s: str) -> str:            # a part is not broken inside
        return s.replace(" ", "\N{NO-BREAK SPACE}")

    rej = m.get("rejections") or {}
    ev = m.get("server_eval") or {}
    parts = [glue(f"round {m['round']:>3} {m['job']:<5}"), glue(f"{m.get('replies', 0)}/{m.get('sampled', 0)} valid")]
    if rej:
        parts.append("rejected " + ", ".join(glue(f"{k} {v}") for k, v in sorted(rej.items())))
    if m.get("alert"):                  # most replies failed: say so, with the causes
        parts.append("ALERT: " + str(m["alert"]))
    if m.get("skipped"):                # the round changed nothing: say so, with the server's reason
        reason = str(m["skipped"])
        parts.append("SKIPPED: " + (reason if len(reason) <= 60 else reason[:59] + "…"))
    for p, e in sorted(ev.items()):
        v = e["perplexity"] if isinstance(e, dict) else e
        fid = f" KL {e['kl']:.3f} top-1 {100 * e['top1']:.0f}%" if isinstance(e, dict) and "kl" in e else ""
        parts.append(glue(f"{p} PPL {v:.2f}{fid}"))
    parts.append(glue(f"{m.get('wall_s', 0):.1f} s"))
    lines = textwrap.wrap("  ".join(parts), width=max(20, width), subsequent_indent="    ",
                          break_on_hyphens=False)
    return "\n".join(lines).replace("\N{NO-BREAK SPACE}", " ")


def _pct(v, ci=None) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}%" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def run_table(model: str, summary: dict) -> Table:
    """The table ``fedquant simulate`` ends with: per text (held-out roles, out-of-domain) and
    profile, the references and the last federated evaluation: perplexity, change vs float with
    its 95% interval, KL(float || quantized) per token and top-1 agreement ("-" where an older
    summary lacks them)."""
    table = Table(title=f"{model}: ONNX Runtime integer model on held-out roles and out-of-domain text "
                        f"({summary['clients']} clients, {summary['rounds']} rounds, {summary['wall_s']} s)")
    for col in ("text", "profile", "QParams", "PPL", "vs float [95%]", "KL", "top-1"):
        right = col not in ("text", "profile", "QParams")
        table.add_column(col, justify="right" if right else "left", no_wrap=right, overflow="fold")

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    for text in ("roles", "OOD"):
        for p, s in summary["profiles"].items():
            last = (s.get("federated_eval") or [None])[-1]
            evs = [("random ids", s.get("random_calib"), s.get("random_calib_ppl")),
                   ("centralized", s.get("centralized"), s.get("centralized_ppl")),
                   ("federated", last, s["federated_ppl"][-1] if s["federated_ppl"] else None)]
            ood_float = next((e["ood"]["float_perplexity"] for _, e, _ in evs if e and e.get("ood")), None)
            table.add_row(text, p, "float", f(s["float_ppl"] if text == "roles" else ood_float), "", "", "")
            for what, ev, ppl in evs:
                ev = (ev or {}) if text == "roles" else ((ev or {}).get("ood") or {})
                if text == "OOD" and not ev:
                    continue
                ppl = ev.get("perplexity", ppl if text == "roles" else None)
                if "vs_float_pct" in ev:
                    inc = _pct(ev["vs_float_pct"], ev.get("vs_float_pct_ci"))
                else:
                    inc = "-" if ppl is None or not s["float_ppl"] else _pct(100 * (ppl / s["float_ppl"] - 1))
                table.add_row(text, p, what, f(ppl), inc, f(ev.get("kl"), "{:.3f}"),
                              f(None if "top1" not in ev else 100 * ev["top1"], "{:.1f}%"))
    dp = (summary.get("privacy") or {}).get("dp")
    if dp:
        table.caption = (f"federated: statistics rounds at (epsilon {dp['epsilon']:.2f}, delta {dp['delta']:g})-DP; "
                         f"not covered: {'; '.join(dp['not_covered'])}")
    return table


@app.command()
def simulate(
    config: Path = typer.Option(Path("configs/default.toml"), "--config", "-c", help="TOML file of SimulationConfig"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="run only the first N rounds of the schedule"),
    clients: Optional[int] = typer.Option(None, "--clients", help="number of simulated clients"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>); an existing "
                                                          "one of the same config is resumed"),
    prepared_from: Optional[Path] = typer.Option(
        None, "--prepared-from", help="reuse the prepared starting QParams, device directory and references of "
                                      "this run directory (same model, data, profiles, server recipe; another "
                                      "schedule is fine): skips minutes of preparation"),
) -> None:
    """Simulate a fleet on this machine with Flower's simulation engine: federated statistics and
    learned ranges for every device profile, evaluated with the ONNX Runtime integer model on
    held-out roles. Writes runs/NAME/: summary.json, metrics.jsonl, plots, QParams, QDQ models,
    encodings; a run started again resumes from its last checkpoint."""
    _quiet_env()
    from quant.configfile import ConfigError
    from simulation.prepare import load_simulation_config, seed_run_dir
    from simulation.simulate import simulate as run

    try:
        cfg = load_simulation_config(config, rounds=rounds, clients=clients)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    out = out or Path("runs") / cfg.name
    total = sum(e.repeat for e in cfg.server.schedule)
    if (out / "checkpoint.safetensors").is_file():
        err.print(f"resuming {out} from its last checkpoint", highlight=False)
    with _progress(transient=False) as progress:
        task = progress.add_task("preparing", total=total)

        def on_round(m: dict) -> None:
            progress.console.print(_round_line(m, progress.console.width), highlight=False, markup=False,
                                   soft_wrap=True)
            progress.update(task, completed=m["round"], description=f"round {m['round']}/{total}")

        try:
            if prepared_from is not None:
                seed_run_dir(cfg, out, prepared_from)
            summary = run(cfg, out, progress=lambda msg: progress.update(task, description=msg),
                          on_round=on_round)
        except (FileNotFoundError, ValueError) as e:
            _fail(str(e))
    Console().print(run_table(cfg.model, summary))
    err.print(f"wrote {out}/summary.json, metrics.jsonl, {', '.join(Path(p).name for p in summary.get('plots', []))}, "
              f"qparams/ and export/", highlight=False)
    for a in summary.get("alerts", []):
        err.print(f"[red]warning:[/red] round {a['round']} ({a['job']}): "
                  f"{escape(str(a.get('alert') or 'skipped: ' + str(a.get('skipped'))))}",
                  soft_wrap=True, highlight=False)


def main() -> None:  # pragma: no cover
    app(prog_name="fedquant")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
