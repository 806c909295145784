"""The `rlhf-sweep` command.

  rlhf-sweep run [key=value ...] [--cfg job] [--multirun] [hydra.run.dir=...]
      one trial with Hydra semantics; prints policy vs reference and the three verdicts;
      writes summary.json and trajectory.png into the run directory.
  rlhf-sweep sweep STUDY [--n-trials N] [--workers K] [--storage URL] [--name NAME] [--tracking-uri URI] [--out DIR] [--new-study]
      run or resume an Optuna study (studies/STUDY.yaml); ends with the Pareto table, CSVs and the report.
      A study stays one experiment: resuming it from an edited file is refused (--new-study: a study of its own).
  rlhf-sweep report STUDY [--storage URL] [--tracking-uri URI] [--out DIR]
      a study's figures and report.md (Pareto front, best-of-n baseline, Gao et al. fits, importances).
  rlhf-sweep compare-fixes [--budget MINUTES] [--seeds N] [--max-seeds N] [--first-seed S] [--arms a,b,c] [--tracking-uri URI] [--out DIR]
      races the fix arms against the baseline (paired by seed) within a budget, recommends a pair or says
      that none is stable, confirms it on held-out seeds; writes fixes.md, fixes.json and a figure.
  rlhf-sweep explain RUN_DIR
      writes RUN_DIR/explain.md: the three observations tied to their mechanisms.
  rlhf-sweep studies
      the shipped and the user's study files, each with its one-line description.
  rlhf-sweep sweep STUDY --dry-run
      the composed search space, objectives, trial count and an estimated wall time; runs nothing.
  rlhf-sweep ui [OUT] [--storage URL] [--tracking-uri URI]
      optuna-dashboard on a study's storage and the MLflow UI on its tracking store, on loopback (extra: ui).
  rlhf-sweep repair STUDY [--storage PATH] [--out DIR]
      a study journal whose last record was cut short (crash, full disk): keep a backup, drop the torn tail.
  rlhf-sweep log RUN_DIR [--tracking-uri URI]
      send a finished run directory to MLflow (e.g. when logging failed at the end of `run`).

Every command also takes --config-dir DIR (your own config groups and overlays, searched after the shipped
conf/; or RLHF_SWEEP_CONFIG_DIR) and --studies-dir DIR (your study files, before ./studies and the shipped
ones; or RLHF_SWEEP_STUDIES_DIR).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path

from rlhf_sweep.config import algorithms
from rlhf_sweep.config.compose import compose, hydra_command_line, hydra_run_dir, load_config, run_under_hydra
from rlhf_sweep.config.paths import CONFIG_DIR_ENV, STUDIES_DIR_ENV, PathsError, add_user_dir
from rlhf_sweep.config.schema import ConfigError
from rlhf_sweep.run import layout, preflight, tracking
from rlhf_sweep.utils.lazy import lazy_import
from rlhf_sweep.utils.runtime import quiet_libraries
from rlhf_sweep.utils.tables import fmt, format_table

# Imported on first use: `rlhf-sweep --help` and a bad config answer at once, and each command pays only for
# what it runs (torch for a trial, matplotlib for figures, Optuna for studies).
pipeline = lazy_import("rlhf_sweep.run.pipeline")
spec = lazy_import("rlhf_sweep.study.spec")
catalog = lazy_import("rlhf_sweep.study.catalog")
storage = lazy_import("rlhf_sweep.study.storage")
journal = lazy_import("rlhf_sweep.study.journal")
dryrun = lazy_import("rlhf_sweep.study.dryrun")
sweep = lazy_import("rlhf_sweep.study.sweep")
report = lazy_import("rlhf_sweep.reporting.report")
explain = lazy_import("rlhf_sweep.reporting.explain")
plots = lazy_import("rlhf_sweep.reporting.plots")
compare = lazy_import("rlhf_sweep.fixes.compare")
ui = lazy_import("rlhf_sweep.app.ui")

USAGE = __doc__  # the module docstring is what `rlhf-sweep --help` prints


def fail(msg: str, code: int = 2) -> None:
    print(f"rlhf-sweep: error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_table(s: dict) -> str:
    """Policy vs reference on held-out prompts, then the verdicts with their numbers."""
    m = s["metrics"]

    def ci(key: str) -> str:
        return f"{m[key]:.3f} [{m[key + '_lo']:.3f}, {m[key + '_hi']:.3f}]"

    rows = [
        ("RM score (std units)", ci("rm/policy"), ci("rm/ref")),
        ("gold score (human proxy)", ci("gold/policy"), ci("gold/ref")),
        ("RM win rate vs reference", ci("rm/win_rate"), "0.5"),
        ("gold win rate vs reference", ci("gold/win_rate"), "0.5"),
        ("length (tokens)", fmt(m["len/policy"]), fmt(m["len/ref"])),
        ("filler tokens", fmt(m["filler/policy"]), fmt(m["filler/ref"])),
        ("position of correct action", fmt(m["directness/policy"]), fmt(m["directness/ref"])),
        ("correct action rate", fmt(m["correct/policy"]), fmt(m["correct/ref"])),
        ("wrong action rate", fmt(m["wrong/policy"]), fmt(m["wrong/ref"])),
        ("KL exact (nats/seq)", fmt(m["kl/exact"]), "0"),
        ("KL k1 / k3 (nats/seq)", f"{m['kl/k1']:.3f} / {m['kl/k3']:.3f}" if _finite(m["kl/k1"]) else "n/a (no token log-probs)", "0"),
        ("KL exact per token", fmt(m["kl/exact_per_token"]), "0"),
    ]
    if "kl/bon_bound" in m:
        rows.append(("KL bound log n - (n-1)/n", fmt(m["kl/bon_bound"]), f"n = {int(m['bon/n'])}"))
    algo = s["config"].get("algo", "ppo")
    out = [format_table((f"held-out (95% CI), algo={algo}", "policy", "reference"), rows, title="")]
    o = s["observations"]
    v1, v3 = o["rm_prefers_policy"], o["kl_increasing"]
    v_rows = [
        ("1. RM prefers the policy", v1["value"],
         f"RM win rate {v1['rm/win_rate']:.3f}, CI [{v1['ci'][0]:.3f}, {v1['ci'][1]:.3f}]"
         + (f" (judge: {v1['judge']})" if "judge" in v1 else "")),
        ("2. humans prefer the reference", o["humans_prefer_reference"]["value"],
         f"gold win rate {o['humans_prefer_reference']['gold/win_rate']:.3f}, CI [{o['humans_prefer_reference']['ci'][0]:.3f}, "
         f"{o['humans_prefer_reference']['ci'][1]:.3f}]; mean gold {m['gold/policy']:.3f} vs {m['gold/ref']:.3f}; "
         f"length {m['len/policy']:.2f} vs {m['len/ref']:.2f}"),
        ("3. KL keeps increasing", v3["value"] if v3.get("applies", True) else "n/a",
         kl_evidence(v3) if v3.get("applies", True) else v3["rule"]),
    ]
    out.append(format_table(("observation", "holds", "evidence"), v_rows, title=""))
    out.append(_why(s["diagnosis"]))
    t = s["timing"]
    out.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(out)


def kl_evidence(v: dict) -> str:
    """Verdict 3's numbers: the autocorrelation-robust trend p, the growth against its threshold, the slope."""
    return (f"trend p={v['p_value']:.2g} (AR(1) null, lag-1 r={v['lag1_autocorr']:.2f}) over iterations {v['iterations_tested']}, "
            f"growth {v['growth']:+.0%} (needs >= {v['min_growth']:.0%}), Sen slope {v['sen_slope_per_iter']:.3f} nats/iter, "
            f"beta={v['beta']:.3g}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _why(d: dict) -> str:
    """The diagnosis in one line: the parts that apply to the run's algorithm (advantages need a policy
    gradient; beta*KL a KL coefficient; k1 terms per-token log-probabilities)."""
    rm_part = "the RM pays {:.2f} per token holding gold fixed ({:.0%} of its gain is length)".format(
        d["reward_model"]["rm_slope_per_token_holding_gold"], d["reward_model"]["share_of_rm_gain_from_length"])
    parts = [rm_part]
    if _finite(d["ppo"]["adv_filler_corr_mean"]):
        parts.append("advantages correlate {:.2f} with filler".format(d["ppo"]["adv_filler_corr_mean"]))
    if _finite(d["kl"]["beta_times_kl"]):
        parts.append("beta*KL = {:.2f} against an RM gain of {:.2f}".format(d["kl"]["beta_times_kl"], d["kl"]["rm_gain"]))
    if _finite(d["kl"]["k1_negative_token_share"]):
        parts.append("{:.0%} of sampled k1 terms are negative".format(d["kl"]["k1_negative_token_share"]))
    return "\nwhy: " + "; ".join(parts) + "."


def _trajectory_figure(summary: dict, cfg) -> str | None:
    """trajectory.png beside summary.json; a plotting problem costs the figure, never the run."""
    try:
        title = algorithms.get(cfg.algo).title(cfg)
        return plots.trajectory(summary["history"], layout.trajectory_path(cfg.run_dir), title=title)
    except Exception as e:
        print(f"warning: no trajectory figure ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _run_job(raw) -> None:
    """One job of `rlhf-sweep run`, run by Hydra (config.compose.run_under_hydra): validate, run, log, print.
    Hydra names the job after this file (cli.log in the run directory)."""
    try:
        cfg = load_config(raw)
    except ConfigError as e:
        fail(str(e))
    run_dir = hydra_run_dir()
    print(f"run directory: {run_dir}")
    try:
        cfg, summary = pipeline.run_config(cfg, run_dir)
    except pipeline.CacheError as e:
        fail(str(e), code=1)
    _trajectory_figure(summary, cfg)
    log_error = None
    if cfg.mlflow.enabled:
        uri = cfg.mlflow.tracking_uri
        try:
            run_id, _ = tracking.log_run_dir(uri, cfg.run_dir, summary)
            print(f"MLflow: run {run_id} in {uri} (experiment {cfg.mlflow.experiment!r})")
        except Exception as e:  # the results are on disk: print them, then say how to log them later
            log_error = (f"logging to MLflow ({uri}) failed: {tracking.short_error(e)}; the run is kept in {cfg.run_dir}: "
                         f"`rlhf-sweep log {cfg.run_dir}` logs it once the store takes writes (--tracking-uri URI for another store)")
    print(run_table(summary))
    print(f"summary: {layout.summary_path(cfg.run_dir)}")
    if log_error:
        fail(log_error, code=1)


def cmd_run(argv: list[str]) -> None:
    """`rlhf-sweep run [key=value ...]`: Hydra's own application, after one-line checks of the config,
    the folders it writes and the tracking store (before Hydra makes a run directory)."""
    try:
        command_line = hydra_command_line(argv)
        if not command_line.multirun:  # a --multirun's sweeps compose job by job: Hydra reports those
            compose(command_line.overrides + command_line.searchpath)
    except ConfigError as e:
        fail(str(e))
    quiet_libraries()
    if not command_line.print_only:
        try:
            preflight.check_run(command_line.overrides + command_line.hydra_overrides, command_line.multirun)
        except preflight.PreflightError as e:
            fail(str(e))
    run_under_hydra(_run_job, command_line.argv)


def cmd_sweep(argv: list[str]) -> None:
    """`rlhf-sweep sweep STUDY ...`: run or resume an Optuna study (study.sweep)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep sweep", description="Run or resume an Optuna study over config keys; "
                                 "the same command again resumes it.")
    ap.add_argument("study", help="a name in studies/ (e.g. beta_clip_frontier) or a path to a study YAML file")
    ap.add_argument("--n-trials", type=int, help="complete trials to end with (default: the study file's n_trials)")
    ap.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study (default 1)")
    ap.add_argument("--storage", help="Optuna RDB URL (sqlite:///..., postgresql://...) or a journal file path "
                    "(default: OUT/optuna.journal)")
    ap.add_argument("--name", help="study name (default: the file's stem)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://mlflow-host:5000 (default: the config's mlflow.tracking_uri)")
    ap.add_argument("--out", help="the study's output directory (default: outputs/studies/NAME)")
    ap.add_argument("--heartbeat", type=int, default=storage.HEARTBEAT_S, metavar="SECONDS",
                    help="RDB storage: a running trial's heartbeat interval; a trial silent for twice that is failed and "
                         f"retried (default {storage.HEARTBEAT_S})")
    ap.add_argument("--new-study", action="store_true", help="run the (edited) study file as a study of its own, named "
                    "NAME-<fingerprint of its definition> (with --out: in OUT-<fingerprint>); a study resumed with another "
                    "definition is refused otherwise")
    ap.add_argument("--dry-run", action="store_true", help="print the composed search space, objectives, trial count and "
                    "an estimated wall time (from trials measured here), and run nothing")
    a = ap.parse_args(argv)
    quiet_libraries()
    if a.dry_run:
        try:
            print(dryrun.render(dryrun.plan(a.study, n_trials=a.n_trials, workers=a.workers, storage=a.storage,
                                            name=a.name, out=a.out, new_study=a.new_study)))
        except spec.StudyError as e:
            fail(str(e))
        return
    try:
        res = sweep.sweep(a.study, n_trials=a.n_trials, workers=a.workers, storage=a.storage, name=a.name,
                          tracking_uri=a.tracking_uri, out=a.out, heartbeat=a.heartbeat, new_study=a.new_study)
    except spec.StudyError as e:
        fail(str(e))
    if not res.interrupted and res.n_complete:
        report.write_report(res.study_name, res.storage, res.tracking_uri, Path(res.out_dir))
    print(res.table)
    print(f"trials: {res.n_complete} complete, {res.n_failed} failed; {os.path.join(res.out_dir, 'trials.csv')}, "
          f"{os.path.join(res.out_dir, 'pareto.csv')}")
    if res.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if res.n_complete < res.n_trials:
        fail(f"the study has {res.n_complete} of {res.n_trials} complete trials; run the same command again to resume", code=1)


def cmd_compare_fixes(argv: list[str]) -> None:
    """`rlhf-sweep compare-fixes`: arms x seeds against the baseline (fixes.compare)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep compare-fixes", description="Race the fix arms against the baseline, paired by "
                                 "seed, within a budget (resumable: runs already in --out are reused); recommend the two best fixes "
                                 "once they are separated from the rest, or say that no pair is stable; confirm the pair and its "
                                 "combination on held-out seeds.")
    ap.add_argument("--budget", type=float, metavar="MINUTES", help="wall time for the whole comparison (default: the study file's "
                    "budget_minutes); the first block of seeds always runs")
    ap.add_argument("--seeds", type=int, help="the first block: seeds every arm runs before any is dropped (default: the study file's)")
    ap.add_argument("--max-seeds", type=int, help="selection seeds per arm at most (default: the study file's)")
    ap.add_argument("--first-seed", type=int, help="the seed pool starts here: selection seeds first .. first+max-seeds-1, then the "
                    "held-out confirmation seeds (default 0)")
    ap.add_argument("--confirm-seeds", type=int, help="held-out seeds the recommended pair is confirmed on (default: the study file's)")
    ap.add_argument("--arms", help="comma-separated experiment overlays; a+b composes two and is confirmed, not raced "
                    "(default: the study file's)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's mlflow.tracking_uri)")
    ap.add_argument("--out", default="outputs/fixes", help="output directory (default: outputs/fixes)")
    ap.add_argument("--workers", type=int, help="local worker processes, cores/workers torch threads each (default 2)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every arm, Hydra syntax (e.g. ppo.iterations=50)")
    a = ap.parse_args(argv)
    quiet_libraries()
    arms = [x.strip() for x in a.arms.split(",") if x.strip()] if a.arms else None
    try:
        res = compare.compare_fixes(arms=arms, seeds=a.seeds, tracking_uri=a.tracking_uri, out=a.out, extra=tuple(a.overrides),
                                  workers=a.workers, budget=a.budget, max_seeds=a.max_seeds, first_seed=a.first_seed,
                                  confirm_seeds=a.confirm_seeds)
    except compare.FixesError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished runs are kept)", file=sys.stderr)
        sys.exit(130)
    print(res.table)
    print(f"wall time {res.wall_s / 60:.1f} min for {res.result['runs_this_invocation']} arm x seed runs made now; "
          f"{os.path.join(res.out_dir, 'fixes.md')}"
          + (f"; MLflow parent run {res.parent_run_id}" if res.parent_run_id else ""))


def cmd_explain(argv: list[str]) -> None:
    """`rlhf-sweep explain RUN_DIR`: write RUN_DIR/explain.md (reporting.explain)."""
    if len(argv) != 1 or argv[0].startswith("-"):
        fail("usage: rlhf-sweep explain RUN_DIR (the directory with a run's summary.json)")
    try:
        path = explain.explain(argv[0])
    except explain.ExplainError as e:
        fail(str(e))
    print(path.read_text())
    print(f"written: {path}")


def cmd_report(argv: list[str]) -> None:
    """`rlhf-sweep report STUDY ...`: a study's figures and report.md (reporting.report)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep report", description="Draw a study's figures (Pareto front with the "
                                 "best-of-n baseline, Gao et al. fits, length, importances) and write report.md.")
    ap.add_argument("study", help="a name in studies/, a study YAML path, or the --name the sweep used")
    ap.add_argument("--storage", help="Optuna RDB URL or journal file path (default: OUT/optuna.journal)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep logged to)")
    ap.add_argument("--out", help="the study's output directory (default: outputs/studies/NAME)")
    a = ap.parse_args(argv)
    storage.quiet()
    try:
        path = report.report(a.study, storage=a.storage, tracking_uri=a.tracking_uri, out=a.out)
    except spec.StudyError as e:
        fail(str(e))
    print(f"report: {path}")


def cmd_studies(argv: list[str]) -> None:
    """`rlhf-sweep studies`: the study files a name finds, with their one-line descriptions (study.catalog.list_studies)."""
    if argv:
        fail(f"rlhf-sweep studies takes no arguments (got {' '.join(argv)}); add directories with --studies-dir DIR")
    try:
        rows = catalog.list_studies()
    except spec.StudyError as e:
        fail(str(e))
    headers = ("study", "kind", "trials", "from", "description")
    cells = [[str(r[k]) for k in ("name", "kind", "trials", "source", "description")] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    for line in [list(headers), ["-" * w for w in widths], *cells]:  # text columns: left-aligned
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print("run one with `rlhf-sweep sweep NAME` (see what it would do with --dry-run); compare_fixes is read by "
          "`rlhf-sweep compare-fixes`")


def cmd_ui(argv: list[str]) -> None:
    """`rlhf-sweep ui [OUT]`: optuna-dashboard and the MLflow UI on loopback (app.ui)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep ui", description="Start optuna-dashboard on a study's storage and the "
                                 "MLflow UI on its tracking store, on loopback; print both addresses; Ctrl-C stops both.")
    ap.add_argument("out", nargs="?", default="outputs", help="a study's output directory (outputs/studies/NAME) or the "
                    "outputs directory, whose most recent study is shown (default: outputs)")
    ap.add_argument("--storage", help="the Optuna storage (journal file or RDB URL; default: the study's optuna.journal)")
    ap.add_argument("--tracking-uri", help="the MLflow tracking store (default: the one the study logged to)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--optuna-port", type=int, default=8080, help="optuna-dashboard's port (default 8080; 0 = any free port)")
    ap.add_argument("--mlflow-port", type=int, default=5000, help="the MLflow UI's port (default 5000; 0 = any free port)")
    a = ap.parse_args(argv)
    try:
        ui.serve(a.out, storage=a.storage, tracking_uri=a.tracking_uri, host=a.host, optuna_port=a.optuna_port,
                 mlflow_port=a.mlflow_port)
    except ui.UIError as e:
        fail(str(e))


# options every command takes: (flags, environment variable) - see config.paths
USER_DIR_FLAGS = {"--config-dir": CONFIG_DIR_ENV, "-cd": CONFIG_DIR_ENV, "--studies-dir": STUDIES_DIR_ENV}


def take_user_dirs(argv: list[str]) -> list[str]:
    """Remove --config-dir DIR / --studies-dir DIR (also --flag=DIR) from argv and put them in the environment,
    where config.compose, study lookups and spawned workers find them."""
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if flag in USER_DIR_FLAGS and (eq or i + 1 < len(argv)):
            if not eq:
                value, i = argv[i + 1], i + 1
            try:
                add_user_dir(USER_DIR_FLAGS[flag], value, flag)
            except PathsError as e:
                fail(str(e))
        elif flag in USER_DIR_FLAGS:
            fail(f"{flag} needs a directory, e.g. {flag} ./my_{'conf' if 'config' in flag or flag == '-cd' else 'studies'}")
        else:
            rest.append(a)
        i += 1
    return rest


def cmd_repair(argv: list[str]) -> None:
    """`rlhf-sweep repair STUDY ...`: drop a torn final record from a study's journal (study.journal)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep repair", description="Repair a study journal whose last record was cut short "
                                 "(a crash or a full disk mid-write): keep a backup copy, drop only the torn tail. Damage "
                                 "anywhere else is reported with its line number and never written over.")
    ap.add_argument("study", help="a name in studies/, a study YAML path, or the --name the sweep used")
    ap.add_argument("--storage", help="the journal file (default: OUT/optuna.journal)")
    ap.add_argument("--out", help="the study's output directory (default: outputs/studies/NAME)")
    a = ap.parse_args(argv)
    storage.quiet()
    name = storage.study_name(a.study)
    journal_file = a.storage or str(layout.journal_path(layout.study_dir(name, a.out)))
    try:
        r = journal.repair(journal_file)
    except spec.StudyError as e:
        fail(str(e))
    try:
        ostudy, name, journal_file, _ = storage.load_study(a.study, journal_file, a.out)
        states = Counter(t.state.name.lower() for t in ostudy.get_trials(deepcopy=False))
        trials = f"study {name!r}: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials")
    except spec.StudyError as e:
        trials = str(e)
    if r.backup is None:
        print(f"{journal_file}: no damage found, nothing changed ({r.records} records); {trials}")
    else:
        print(f"repaired {journal_file}: dropped the torn last record (line {r.dropped_line}, {r.dropped_bytes} bytes); "
              f"backup: {r.backup}; {trials}")


def cmd_log(argv: list[str]) -> None:
    """`rlhf-sweep log RUN_DIR`: send a finished run directory to an MLflow tracking store (run.tracking)."""
    ap = argparse.ArgumentParser(prog="rlhf-sweep log", description="Log a finished run directory (summary.json, "
                                 "trajectory.png) to MLflow as one run, e.g. after logging failed at the end of "
                                 "`rlhf-sweep run`. A summary already logged there is not logged twice.")
    ap.add_argument("run_dir", help="the run directory (rlhf-sweep run prints it)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run's mlflow.tracking_uri)")
    a = ap.parse_args(argv)
    quiet_libraries()
    try:
        summary = tracking.read_run_dir(a.run_dir)
        uri = a.tracking_uri or (summary["config"].get("mlflow") or {}).get("tracking_uri")
        if not uri:
            fail(f"{a.run_dir}: its config names no mlflow.tracking_uri; pass --tracking-uri")
        preflight.check(uri, "--tracking-uri" if a.tracking_uri else "the run's mlflow.tracking_uri")
    except (tracking.RunDirError, preflight.PreflightError) as e:
        fail(str(e))
    try:
        run_id, new = tracking.log_run_dir(uri, a.run_dir, summary, once=True)
    except Exception as e:
        fail(f"logging {a.run_dir} to MLflow ({uri}) failed: {tracking.short_error(e)}", code=1)
    print(f"MLflow: run {run_id} in {uri}" + ("" if new else " (this summary.json was already logged there: nothing sent)"))


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "compare-fixes": cmd_compare_fixes, "explain": cmd_explain,
            "studies": cmd_studies, "ui": cmd_ui, "repair": cmd_repair, "log": cmd_log}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], take_user_dirs(argv[1:])
    if cmd not in COMMANDS:
        fail(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    COMMANDS[cmd](rest)


if __name__ == "__main__":
    main()
