"""The `rlhf-sweep` command.

  rlhf-sweep run [key=value ...] [--cfg job] [--multirun] [hydra.run.dir=...]
      one trial with Hydra semantics; prints policy vs reference and the three verdicts;
      writes summary.json and trajectory.png into the run directory.
  rlhf-sweep sweep STUDY [--n-trials N] [--workers K] [--storage URL] [--name NAME] [--tracking-uri URI] [--out DIR]
      run or resume an Optuna study (studies/STUDY.yaml); ends with the Pareto table, CSVs and the report.
  rlhf-sweep report STUDY [--storage URL] [--tracking-uri URI] [--out DIR]
      a study's figures and report.md (Pareto front, best-of-n baseline, Gao et al. fits, importances).
  rlhf-sweep compare-fixes [--seeds N] [--arms a,b,c] [--tracking-uri URI] [--out DIR]
      every fix arm x seed against the baseline, paired by seed; writes fixes.md and a figure.
  rlhf-sweep explain RUN_DIR
      writes RUN_DIR/explain.md: the three observations tied to their mechanisms.
"""

from __future__ import annotations

import math
import os
import sys

from .config import CONF_DIR, ConfigError, compose, load_config
from .runtime import quiet_libraries
from .tables import fmt, format_table

USAGE = __doc__


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
         f"Mann-Kendall p={v3['p_value']:.2g} over iterations {v3['iterations_tested']}, "
         f"Sen slope {v3['sen_slope_per_iter']:.3f} nats/iter, beta={v3['beta']:.3g}" if v3.get("applies", True) else v3["rule"]),
    ]
    out.append(format_table(("observation", "holds", "evidence"), v_rows, title=""))
    out.append(_why(s["diagnosis"]))
    t = s["timing"]
    out.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(out)


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
        from . import plots

        c = cfg.ppo
        title = {"ppo": f"rlhf-sweep run, seed {cfg.seed}: β={c.beta:g}, clip ε={c.clip_eps:g}, KL estimator {c.kl_estimator}",
                 "rloo": f"rlhf-sweep run algo=rloo, seed {cfg.seed}: β={cfg.rloo.beta:g}, k={cfg.rloo.num_generations}",
                 "grpo": f"rlhf-sweep run algo=grpo, seed {cfg.seed}: β={cfg.grpo.beta:g}, G={cfg.grpo.num_generations}, "
                         f"KL {cfg.grpo.kl_estimator} in the {cfg.grpo.kl_in}",
                 "dpo": f"rlhf-sweep run algo=dpo, seed {cfg.seed}: β={cfg.dpo.beta:g}",
                 "ipo": f"rlhf-sweep run algo=ipo, seed {cfg.seed}: β (τ)={cfg.dpo.beta:g}",
                 "bon": f"rlhf-sweep run algo=bon, seed {cfg.seed}: best-of-n' for n' up to {cfg.bon.n}"}[cfg.algo]
        return plots.trajectory(summary["history"], os.path.join(cfg.run_dir, "trajectory.png"), title=title)
    except Exception as e:
        print(f"warning: no trajectory figure ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _run_trial(raw) -> None:
    """Body of `rlhf-sweep run` under hydra.main: validate, run, log, print."""
    from hydra.core.hydra_config import HydraConfig

    from . import pipeline, tracking

    try:
        cfg = load_config(raw)
    except ConfigError as e:
        fail(str(e))
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    print(f"run directory: {cfg.run_dir}")
    summary = pipeline.run(cfg)
    figure = _trajectory_figure(summary, cfg)
    if cfg.mlflow.enabled:
        run_id = tracking.log_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, summary, cfg.run_dir,
                                  name=os.path.basename(cfg.run_dir.rstrip("/")), tags={"seed": str(cfg.seed)})
        if figure:
            tracking.client_for(cfg.mlflow.tracking_uri).log_artifact(run_id, figure)
        print(f"MLflow: run {run_id} in {cfg.mlflow.tracking_uri} (experiment {cfg.mlflow.experiment!r})")
    print(run_table(summary))
    print(f"summary: {os.path.join(cfg.run_dir, 'summary.json')}")


def cmd_run(argv: list[str]) -> None:
    import hydra

    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--resolve"}
    overrides, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = a in ("--cfg", "-c", "--package", "-p")
            continue
        if a.startswith("-") or a.startswith("hydra.") or a.startswith("hydra/"):
            continue
        overrides.append(a)
    if not multirun:  # fail on bad input before Hydra makes a run directory, in one line
        try:
            compose(overrides)
        except ConfigError as e:
            fail(str(e))
    quiet_libraries()
    main = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(_run_trial)
    sys.argv = ["rlhf-sweep run", *argv]
    main()


def cmd_sweep(argv: list[str]) -> None:
    """`rlhf-sweep sweep STUDY ...`: run or resume an Optuna study (rlhf_sweep/sweep.py)."""
    import argparse

    from . import sweep

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
    ap.add_argument("--heartbeat", type=int, default=sweep.HEARTBEAT_S, metavar="SECONDS",
                    help="RDB storage: a running trial's heartbeat interval; a trial silent for twice that is failed and "
                         f"retried (default {sweep.HEARTBEAT_S})")
    a = ap.parse_args(argv)
    quiet_libraries()
    try:
        res = sweep.sweep(a.study, n_trials=a.n_trials, workers=a.workers, storage=a.storage, name=a.name,
                          tracking_uri=a.tracking_uri, out=a.out, heartbeat=a.heartbeat)
    except sweep.StudyError as e:
        fail(str(e))
    print(res.table)
    print(f"trials: {res.n_complete} complete, {res.n_failed} failed; {os.path.join(res.out_dir, 'trials.csv')}, "
          f"{os.path.join(res.out_dir, 'pareto.csv')}")
    if res.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if res.n_complete < res.n_trials:
        fail(f"the study has {res.n_complete} of {res.n_trials} complete trials; run the same command again to resume", code=1)


def cmd_compare_fixes(argv: list[str]) -> None:
    """`rlhf-sweep compare-fixes`: arms x seeds against the baseline (rlhf_sweep/fixes.py)."""
    import argparse

    from . import fixes

    ap = argparse.ArgumentParser(prog="rlhf-sweep compare-fixes", description="Run every fix arm x seed (resumable), "
                                 "compare each arm with the baseline paired by seed, recommend two fixes.")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: studies/compare_fixes.yaml, 5)")
    ap.add_argument("--arms", help="comma-separated experiment overlays; a+b composes two (default: the study file's)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's mlflow.tracking_uri)")
    ap.add_argument("--out", default="outputs/fixes", help="output directory (default: outputs/fixes)")
    ap.add_argument("--workers", type=int, help="local worker processes, 1 torch thread each (default 2)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every arm, Hydra syntax (e.g. ppo.iterations=50)")
    a = ap.parse_args(argv)
    quiet_libraries()
    arms = [x.strip() for x in a.arms.split(",") if x.strip()] if a.arms else None
    try:
        res = fixes.compare_fixes(arms=arms, seeds=a.seeds, tracking_uri=a.tracking_uri, out=a.out,
                                  extra=tuple(a.overrides), workers=a.workers)
    except fixes.FixesError as e:
        fail(str(e))
    print(res.table)
    print(f"wall time {res.wall_s / 60:.1f} min for {res.result['runs_this_invocation']} arm x seed runs; "
          f"{os.path.join(res.out_dir, 'fixes.md')}"
          + (f"; MLflow parent run {res.parent_run_id}" if res.parent_run_id else ""))


def cmd_explain(argv: list[str]) -> None:
    """`rlhf-sweep explain RUN_DIR`: write RUN_DIR/explain.md (rlhf_sweep/explain.py)."""
    from . import explain

    if len(argv) != 1 or argv[0].startswith("-"):
        fail("usage: rlhf-sweep explain RUN_DIR (the directory with a run's summary.json)")
    try:
        path = explain.explain(argv[0])
    except explain.ExplainError as e:
        fail(str(e))
    print(path.read_text())
    print(f"written: {path}")


def cmd_report(argv: list[str]) -> None:
    """`rlhf-sweep report STUDY ...`: a study's figures and report.md (rlhf_sweep/report.py)."""
    import argparse

    from . import report, sweep

    ap = argparse.ArgumentParser(prog="rlhf-sweep report", description="Draw a study's figures (Pareto front with the "
                                 "best-of-n baseline, Gao et al. fits, length, importances) and write report.md.")
    ap.add_argument("study", help="a name in studies/, a study YAML path, or the --name the sweep used")
    ap.add_argument("--storage", help="Optuna RDB URL or journal file path (default: OUT/optuna.journal)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep logged to)")
    ap.add_argument("--out", help="the study's output directory (default: outputs/studies/NAME)")
    a = ap.parse_args(argv)
    sweep._quiet()
    try:
        path = report.report(a.study, storage=a.storage, tracking_uri=a.tracking_uri, out=a.out)
    except sweep.StudyError as e:
        fail(str(e))
    print(f"report: {path}")


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "compare-fixes": cmd_compare_fixes, "explain": cmd_explain}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        fail(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    COMMANDS[cmd](rest)


if __name__ == "__main__":
    main()
