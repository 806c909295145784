"""Which fixes should an RLHF team make? `rlhf-sweep compare-fixes` answers with paired seeds.

This module owns the comparison: reading `studies/compare_fixes.yaml` (arms and seeds),
running every arm x seed in local worker processes (each arm is an `experiment` overlay in
`conf/experiment/`, and `a+b` composes two of them as `experiment=[a,b]`), the paired-by-seed
bootstrap intervals of each arm against the baseline, each fix's cost, the two recommended
fixes, and the outputs: a terminal table, `fixes.md`, `fixes.json`, a figure and MLflow runs
(a parent run, one nested run per arm x seed).

A run whose `OUT/runs/ARM/seed-N/summary.json` exists with the config its arm composes to is
not run again, so an interrupted comparison resumes where it stopped (and an edited overlay,
such as `combined` after a new measurement, reruns its arm).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from . import preflight
from .config import ConfigError, compose
from .paths import config_dirs, group_options, shipped_studies_dir
from .runtime import cores, quiet_libraries, set_worker_threads
from .tables import format_table, md_table

STUDY_FILE = shipped_studies_dir() / "compare_fixes.yaml"

# (summary metric, label, +1 if larger is better for the team, -1 if smaller is, 0 if neither)
METRICS = (
    ("gold/policy", "gold", +1),
    ("gold/win_rate", "gold win rate", +1),
    ("len/policy", "length", -1),
    ("filler/policy", "filler", -1),
    ("kl/exact", "KL exact", -1),
    ("rm/policy", "RM score", 0),
)
RM_SIDE = ("rm.",)  # overrides that change the reward model make an arm RM-side


class FixesError(ValueError):
    """A bad arm, seed count or study file; the message is one line naming the key and the fix."""


# ----- statistics: pure functions ------------------------------------------------------------------
def paired_bootstrap_ci(arm: np.ndarray, base: np.ndarray, n_boot: int = 10000, confidence: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences arm - base (paired by seed) and its percentile bootstrap interval.

    Resamples whole seeds with replacement, so the interval reflects how much the fix's effect
    varies from seed to seed. With few seeds it is narrow rather than conservative; that is what
    a team can afford.
    """
    d = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap_ci needs two equal-length, non-empty 1-D arrays")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], method="inverted_cdf")
    return float(d.mean()), float(lo), float(hi)


def excludes_zero(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


# ----- the study: arms and seeds -------------------------------------------------------------------
@dataclass
class FixesSpec:
    arms: list[str]
    seeds: list[int]
    baseline: str = "baseline"
    combinations: list[str] = field(default_factory=list)  # arms that combine others: never recommended alone
    workers: int = 2
    n_boot: int = 10000
    confidence: float = 0.95


def experiments() -> list[str]:
    """The experiment overlays of the shipped conf/ and of the user's config directories."""
    return group_options("experiment")


def arm_parts(arm: str) -> list[str]:
    """'rm_ensemble+kl_control' -> ['rm_ensemble', 'kl_control'] (checked against conf/experiment/)."""
    parts = [p.strip() for p in arm.split("+") if p.strip()]
    known = experiments()
    for p in parts:
        if p not in known:
            raise FixesError(f"unknown arm {p!r}; arms are experiment overlays in conf/experiment/: {', '.join(known)} "
                             f"(combine two with a+b; looked in {', '.join(str(d / 'experiment') for d in config_dirs())})")
    if not parts:
        raise FixesError("an empty arm name; give --arms a,b,c with names from conf/experiment/")
    return parts


def arm_overrides(arm: str) -> list[str]:
    parts = arm_parts(arm)
    return [f"experiment={parts[0]}"] if len(parts) == 1 else [f"experiment=[{','.join(parts)}]"]


def load_spec(path: str | Path = STUDY_FILE, arms: list[str] | None = None, seeds: int | None = None) -> FixesSpec:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    allowed = {"description", "arms", "seeds", "baseline", "combinations", "workers", "n_boot", "confidence"}
    for k in raw:
        if k not in allowed:
            raise FixesError(f"unknown key {k!r} in {path}; keys: {', '.join(sorted(allowed))}")
    n_seeds = seeds if seeds is not None else int(raw.get("seeds", 5))
    if n_seeds < 1:
        raise FixesError(f"--seeds={n_seeds} is invalid: --seeds accepts an integer >= 1 (5 is the default; 1 gives no interval)")
    spec = FixesSpec(arms=list(arms or raw.get("arms", [])), seeds=list(range(n_seeds)),
                     baseline=raw.get("baseline", "baseline"), combinations=list(raw.get("combinations", [])),
                     workers=int(raw.get("workers", 2)), n_boot=int(raw.get("n_boot", 10000)),
                     confidence=float(raw.get("confidence", 0.95)))
    if spec.baseline not in spec.arms:
        spec.arms.insert(0, spec.baseline)
    for arm in spec.arms:
        compose([*arm_overrides(arm), "seed=0"])  # unknown arms and bad overlays fail here, in one line
    return spec


def is_rm_side(summary: dict, base: dict) -> bool:
    """Does this arm train a different reward model than the baseline?"""
    return summary["config"]["rm"] != base["config"]["rm"]


# ----- running arm x seed in worker processes ------------------------------------------------------
def _init_worker() -> None:
    set_worker_threads(1)
    quiet_libraries()


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed-{seed}"


def run_one(arm: str, seed: int, out: str, extra: tuple[str, ...] = (), threads: int = 1) -> str:
    """One arm x seed: the pipeline (the other worker waits on a cached SFT or RM being built); returns summary.json."""
    from . import pipeline

    cfg = compose([*arm_overrides(arm), f"seed={seed}", "progress=false", "mlflow.enabled=false", *extra])
    cfg.threads = threads
    cfg.run_dir = str(run_dir(Path(out), arm, seed))
    pipeline.run(cfg, say=lambda *_: None)
    return str(Path(cfg.run_dir) / "summary.json")


RUN_ONLY_KEYS = ("run_dir", "progress", "mlflow")  # config keys that do not change a run's result (threads does: float order)


def worker_threads(workers: int) -> int:
    """Torch threads per run: 1 in each of several workers, every core (0) for a single one."""
    return 0 if workers <= 1 else 1


def is_done(out: Path, arm: str, seed: int, extra: tuple[str, ...] = (), threads: int = 1) -> bool:
    """A finished run with the config this arm composes to now, on the same effective thread count
    (an edited overlay, or another thread count, runs again)."""
    import dataclasses

    path = run_dir(out, arm, seed) / "summary.json"
    if not path.exists():
        return False
    want = dataclasses.asdict(compose([*arm_overrides(arm), f"seed={seed}", *extra]))
    try:
        have = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError):  # a damaged summary: the run is redone and the file rewritten
        return False
    if (have.get("threads") or cores()) != (threads or cores()):
        return False
    return all(have.get(k) == v for k, v in want.items() if k not in (*RUN_ONLY_KEYS, "threads"))


def run_all(spec: FixesSpec, out: Path, extra: tuple[str, ...] = (), progress: bool = True) -> tuple[dict[str, dict[int, dict]], int]:
    """Every arm x seed not yet done, on `spec.workers` processes; returns all summaries and how many ran now."""
    from tqdm.auto import tqdm

    todo = [(a, s) for a in spec.arms for s in spec.seeds if not is_done(out, a, s, extra, worker_threads(spec.workers))]
    done = len(spec.arms) * len(spec.seeds) - len(todo)
    bar = tqdm(total=len(spec.arms) * len(spec.seeds), initial=done, desc="arm x seed", disable=not progress)
    if todo and spec.workers > 1:
        import multiprocessing as mp

        # spawn: a fresh interpreter per worker, no forked torch thread pools
        with ProcessPoolExecutor(spec.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
            futures = {pool.submit(run_one, a, s, str(out), extra): (a, s) for a, s in todo}
            for fut in as_completed(futures):
                fut.result()  # a failed run stops the comparison with its error; rerun to resume
                a, s = futures[fut]
                bar.set_postfix_str(f"{a} seed {s}")
                bar.update(1)
    else:
        threads = worker_threads(spec.workers)
        for a, s in todo:
            run_one(a, s, str(out), extra, threads)
            bar.set_postfix_str(f"{a} seed {s}")
            bar.update(1)
    bar.close()
    summaries = {a: {s: json.loads((run_dir(out, a, s) / "summary.json").read_text()) for s in spec.seeds} for a in spec.arms}
    return summaries, len(todo)


# ----- comparison ----------------------------------------------------------------------------------
def _values(runs: dict[int, dict], seeds: list[int], get) -> np.ndarray:
    return np.array([get(runs[s]) for s in seeds], dtype=float)


def _metric(key: str):
    return lambda s: s["metrics"][key]


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def compare(spec: FixesSpec, summaries: dict[str, dict[int, dict]]) -> dict:
    """Per arm: mean of each metric, the paired difference against the baseline with its interval, and costs."""
    base = summaries[spec.baseline]
    seeds = spec.seeds
    result: dict = {"baseline": spec.baseline, "seeds": seeds, "confidence": spec.confidence, "arms": {}}
    for arm, runs in summaries.items():
        row: dict = {"overrides": arm_overrides(arm), "mean": {}, "diff": {}, "per_seed": {}}
        for key, _label, _sign in METRICS + (("rm/acc_labels", "", 0), ("rm/acc_gold", "", 0)):
            a, b = _values(runs, seeds, _metric(key)), _values(base, seeds, _metric(key))
            row["mean"][key] = float(a.mean())
            row["per_seed"][key] = a.tolist()
            if arm != spec.baseline:
                m, lo, hi = paired_bootstrap_ci(a, b, spec.n_boot, spec.confidence)
                row["diff"][key] = {"mean": m, "lo": lo, "hi": hi, "excludes_zero": excludes_zero(lo, hi)}
        # cost in CPU seconds (workers use one thread, so other processes on the cores do not inflate it):
        # PPO + evaluation per run, and RM training (nan where a cached RM predates this record)
        ppo_s = _values(runs, seeds, lambda s: s["cost"]["ppo_eval_cpu_seconds"])
        rm_s = _values(runs, seeds, lambda s: s["cost"].get("rm_train_cpu_seconds", float("nan")))
        row["ppo_eval_seconds"] = float(ppo_s.mean())
        row["rm_train_seconds"] = _nanmean(rm_s)
        first = runs[seeds[0]]
        row["rm_side"] = is_rm_side(first, base[seeds[0]])
        row["ensemble_size"] = first["config"]["rm"]["ensemble_size"]
        result["arms"][arm] = row
    b = result["arms"][spec.baseline]
    for row in result["arms"].values():
        extra_rm = 0.0
        if row["rm_side"]:  # an RM-side fix trains its own RM(s) instead of the baseline's
            extra_rm = row["rm_train_seconds"] - b["rm_train_seconds"]
        row["extra_seconds_per_run"] = row["ppo_eval_seconds"] - b["ppo_eval_seconds"] + (extra_rm if math.isfinite(extra_rm) else 0.0)
        row["extra_rm_seconds"] = extra_rm
    result["recommended"] = recommend(spec, result)
    return result


def recommend(spec: FixesSpec, result: dict) -> list[str]:
    """The two single fixes with the largest gold gain whose interval excludes zero (gain > 0)."""
    singles = [a for a in result["arms"] if a != spec.baseline and "+" not in a and a not in spec.combinations]
    good = [a for a in singles if result["arms"][a]["diff"]["gold/policy"]["lo"] > 0]
    return sorted(good, key=lambda a: -result["arms"][a]["diff"]["gold/policy"]["mean"])[:2]


# ----- outputs -------------------------------------------------------------------------------------
def ci_text(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def diff_table(spec: FixesSpec, result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", *(f"d {label}" for _k, label, _s in METRICS)]
    rows = []
    for arm, row in result["arms"].items():
        if arm == spec.baseline:
            rows.append([f"{arm} (mean)", *(f"{row['mean'][k]:.3f}" for k, _l, _s in METRICS)])
        else:
            rows.append([arm, *(ci_text(row["diff"][k]) for k, _l, _s in METRICS)])
    return headers, rows


def cost_table(spec: FixesSpec, result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "side", "d RM acc labels", "d RM acc gold", "proxy given up", "extra CPU s/run"]
    rows = []
    for arm, row in result["arms"].items():
        if arm == spec.baseline:
            continue
        side = ("RM" if row["rm_side"] else "PPO") + (f", {row['ensemble_size']} RMs" if row["ensemble_size"] > 1 else "")
        d = row["diff"]
        rows.append([arm, side, ci_text(d["rm/acc_labels"]), ci_text(d["rm/acc_gold"]),
                     f"{-d['rm/policy']['mean']:+.3f}", f"{row['extra_seconds_per_run']:+.1f}"])
    return headers, rows


def terminal_table(spec: FixesSpec, result: dict) -> str:
    conf = f"{spec.confidence:.0%}"
    h1, r1 = diff_table(spec, result)
    h2, r2 = cost_table(spec, result)
    rec = result["recommended"]
    lines = [
        format_table(h1, r1, title=f"each arm minus {spec.baseline}, paired by seed ({len(spec.seeds)} seeds), mean [{conf} bootstrap]"),
        "",
        format_table(h2, r2, title="costs"),
        "",
        "recommended: " + (", ".join(rec) if rec else "none (no single fix's gold interval lies above zero)"),
    ]
    return "\n".join(lines)


def trade_off(spec: FixesSpec, result: dict, arm: str) -> str:
    r, b = result["arms"][arm], result["arms"][spec.baseline]
    d = r["diff"]
    parts = [
        f"gold {b['mean']['gold/policy']:.3f} -> {r['mean']['gold/policy']:.3f} ({ci_text(d['gold/policy'])}), "
        f"gold win rate vs reference {b['mean']['gold/win_rate']:.3f} -> {r['mean']['gold/win_rate']:.3f}",
        f"length {b['mean']['len/policy']:.2f} -> {r['mean']['len/policy']:.2f} tokens, "
        f"filler {b['mean']['filler/policy']:.2f} -> {r['mean']['filler/policy']:.2f}",
        f"KL {b['mean']['kl/exact']:.1f} -> {r['mean']['kl/exact']:.1f} nats/seq",
    ]
    if r["rm_side"]:
        parts.append(f"RM accuracy on labeler labels {b['mean']['rm/acc_labels']:.3f} -> {r['mean']['rm/acc_labels']:.3f} "
                     f"and on gold order {b['mean']['rm/acc_gold']:.3f} -> {r['mean']['rm/acc_gold']:.3f}")
    else:
        parts.append(f"the proxy (RM) score it gives up: {-d['rm/policy']['mean']:.3f} std units "
                     f"({b['mean']['rm/policy']:.3f} -> {r['mean']['rm/policy']:.3f})")
    extra = f"extra compute {r['extra_seconds_per_run']:+.1f} CPU s per run"
    if r["rm_side"] and math.isfinite(r["extra_rm_seconds"]):
        extra += f" (of which RM training {r['extra_rm_seconds']:+.1f} CPU s, paid once per RM and cached)"
    parts.append(extra)
    return "; ".join(parts) + "."


def write_markdown(path: Path, spec: FixesSpec, result: dict, wall_s: float, figure: str | None) -> None:
    conf = f"{spec.confidence:.0%}"
    h1, r1 = diff_table(spec, result)
    h2, r2 = cost_table(spec, result)
    lines = [
        "# Which fixes? Paired comparison against the baseline",
        "",
        *(["**One seed: the intervals below are single differences, not intervals.**"] if len(spec.seeds) == 1 else []),
        "",
        f"Seeds {spec.seeds} (each arm runs on the same seeds as the baseline; differences are paired by seed). "
        f"Intervals: {conf} percentile bootstrap over seeds ({spec.n_boot} resamples), written `[low, high]`. "
        f"Wall time of this invocation: {wall_s / 60:.1f} min for {result['runs_this_invocation']} arm x seed runs "
        f"({spec.workers} worker processes; runs already in the output directory are reused).",
        "",
        "## Arms",
        "",
        *(f"- `{a}`: `{' '.join(arm_overrides(a))}`" for a in spec.arms),
        "",
        "## Effect on held-out metrics (arm minus baseline)",
        "",
        md_table(h1, r1),
        "",
        "## Costs",
        "",
        "RM accuracy is on held-out labeled pairs; 'proxy given up' is the drop in the arm's own RM score "
        "(for RM-side arms that is another RM's scale); extra CPU seconds per run are PPO + evaluation against the "
        "baseline, plus RM training for RM-side arms (CPU time, so other processes sharing the cores do not inflate it).",
        "",
        md_table(h2, r2),
        "",
        "## Recommendation",
        "",
    ]
    rec = result["recommended"]
    if not rec:
        lines.append("No single fix raised gold with an interval above zero on these seeds.")
    for i, arm in enumerate(rec, 1):
        lines.append(f"{i}. **{arm}**: {trade_off(spec, result, arm)}")
    for arm in result["arms"]:
        if "+" in arm or arm in spec.combinations:
            lines += ["", f"Combination `{arm}`: {trade_off(spec, result, arm)}"]
    lines += ["", "## Per seed", ""]
    ph = ["arm", "metric", *(f"seed {s}" for s in spec.seeds)]
    pr = [[a, k, *(f"{v:.3f}" for v in row["per_seed"][k])] for a, row in result["arms"].items() for k in ("gold/policy", "kl/exact", "len/policy")]
    lines.append(md_table(ph, pr))
    if figure:
        lines += ["", f"![arms x metrics]({figure})"]
    path.write_text("\n".join(lines) + "\n")


def log_mlflow(uri: str, spec: FixesSpec, result: dict, summaries: dict, out: Path, files: list[Path]) -> str:
    """A parent run with the comparison, and a nested run per arm x seed."""
    from mlflow.entities import Metric, Param

    from . import tracking

    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, "rlhf-sweep", uri)
    parent = tracking.start_run(client, exp_id, f"compare-fixes-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"rlhf_sweep.role": "compare-fixes"})
    now = int(time.time() * 1000)
    params = [Param("arms", ",".join(spec.arms)), Param("seeds", ",".join(map(str, spec.seeds))),
              Param("baseline", spec.baseline), Param("recommended", ",".join(result["recommended"]) or "none")]
    metrics = []
    for arm, row in result["arms"].items():
        name = arm.replace("+", "-plus-")  # MLflow metric names may not contain '+'
        for key, d in row["diff"].items():
            metrics += [Metric(f"{name}/d_{key}", d["mean"], now, 0), Metric(f"{name}/d_{key}_lo", d["lo"], now, 0),
                        Metric(f"{name}/d_{key}_hi", d["hi"], now, 0)]
        metrics.append(Metric(f"{name}/extra_seconds_per_run", row["extra_seconds_per_run"], now, 0))
    metrics = [m for m in metrics if math.isfinite(m.value)]
    client.log_batch(parent, params=params)
    for chunk in tracking.chunks(metrics, tracking.MAX_METRICS_PER_CALL):
        client.log_batch(parent, metrics=chunk)
    for f in files:
        if f.exists():
            client.log_artifact(parent, str(f))
    for arm, runs in summaries.items():
        for seed, summary in runs.items():
            tracking.log_finished(client, exp_id, summary, str(run_dir(out, arm, seed)), name=f"{arm}-s{seed}",
                                  tags={"arm": arm, "seed": str(seed), "rlhf_sweep.role": "compare-fixes-run"}, parent_run_id=parent)
    client.set_terminated(parent, status="FINISHED")
    return parent


def draw_figure(spec: FixesSpec, result: dict, summaries: dict, path: Path) -> str:
    from . import plots

    diffs = {a: r["diff"] for a, r in result["arms"].items() if a != spec.baseline}
    points = {a: [(runs[s]["metrics"]["kl/exact"], runs[s]["metrics"]["gold/policy"]) for s in spec.seeds] for a, runs in summaries.items()}
    ref_gold = float(np.mean([summaries[spec.baseline][s]["metrics"]["gold/ref"] for s in spec.seeds]))
    return plots.fixes_figure(diffs, [(k, label) for k, label, _s in METRICS], points, path, ref_gold)


@dataclass
class FixesResult:
    result: dict
    table: str
    out_dir: str
    wall_s: float
    parent_run_id: str | None


def compare_fixes(arms: list[str] | None = None, seeds: int | None = None, tracking_uri: str | None = None,
                  out: str | None = None, study: str | Path = STUDY_FILE, extra: tuple[str, ...] = (),
                  workers: int | None = None, progress: bool = True) -> FixesResult:
    """Run (or resume) every arm x seed, compare, write the outputs, log to MLflow."""
    t0 = time.perf_counter()
    try:
        spec = load_spec(study, arms, seeds)
        compose(list(extra))  # a bad extra override fails before any run
    except ConfigError as e:
        raise FixesError(str(e)) from None
    if workers is not None:
        spec.workers = workers
    out_dir = Path(out or "outputs/fixes")
    base_cfg = compose(list(extra))
    uri = tracking_uri or (base_cfg.mlflow.tracking_uri if base_cfg.mlflow.enabled else None)
    try:
        preflight.check(uri, "--tracking-uri" if tracking_uri else "mlflow.tracking_uri", {"--out": out_dir, "cache_dir": base_cfg.cache_dir})
    except preflight.PreflightError as e:
        raise FixesError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    if uri:
        from . import tracking

        tracking.experiment_id(tracking.client_for(uri), "rlhf-sweep", uri)  # create the store once, before any worker
    summaries, n_ran = run_all(spec, out_dir, tuple(extra), progress)
    result = compare(spec, summaries)
    figure = draw_figure(spec, result, summaries, out_dir / "fixes.png")
    wall = time.perf_counter() - t0
    result["wall_seconds"] = wall
    result["runs_this_invocation"] = n_ran
    (out_dir / "fixes.json").write_text(json.dumps(result, indent=2))
    write_markdown(out_dir / "fixes.md", spec, result, wall, Path(figure).name if figure else None)
    table = terminal_table(spec, result)
    parent = None
    if uri:
        parent = log_mlflow(uri, spec, result, summaries, out_dir,
                            [out_dir / "fixes.md", out_dir / "fixes.json"] + ([Path(figure)] if figure else []))
    return FixesResult(result, table, str(out_dir), wall, parent)
