"""Frontier per minute: how fast each Optuna sampler finds a study's gold/KL front, per trial and per wall minute.

    .venv/bin/python bench/frontier.py [--study beta_clip_frontier] [--samplers tpe,nsga2,random,gp] [--seeds 3]
                                       [--grid 12x6] [--workers 2] [--startup 8] [--out outputs/bench/frontier]

1. Reference front: a dense grid over the study's space (per searched float knob, `--grid` values,
   log-spaced where the knob is log-scaled; every choice of a categorical one), run as a study with
   the grid sampler through `rlhf-sweep sweep`'s runner. Its journal in OUT/grid-SHAPE/ is the cache:
   a rerun finds every grid trial complete and runs none.
2. Each sampler at the study's budget (its n_trials) with sampler seeds 0..S-1, interleaved (seed 0
   of every sampler, then seed 1, ...) so that a change in machine load hits all samplers alike.
   Every run is a fresh study swept by `sweep.sweep` with `--workers` worker processes from a warm
   SFT/RM cache, in a subprocess timed from its start: the wall minutes hold what a researcher waits
   for (interpreter and worker start-up, the sampler's own time, the trials, MLflow logging), not the
   report. A finished run is kept (OUT/runs/SAMPLER-sSEED/run.json) and reused by a rerun; an
   unfinished one is deleted and run again, since its clock was broken.
3. After every completed trial (completion order), the hypervolume of the front so far against the
   study's reference point (rlhf_sweep/maths/hypervolume.py: its `reference_point`, else the default rule
   applied to the grid's trials), as a share of the grid front's hypervolume; the trials and minutes
   each run took to reach `--share` (0.9) of it; a figure (OUT/frontier.png).

Each sampler starts from `--startup` random trials (tpe and gp: n_startup_trials; nsga2: its first
generation, population_size), so that they differ only in what they do after. The last line
printed is one JSON object. Run it alone on the machine: wall minutes are only comparable within one load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_sweep.maths import hypervolume  # noqa: E402
from rlhf_sweep.study.spec import SAMPLERS, find_study_file, load_spec  # noqa: E402
from rlhf_sweep.utils.tables import format_table  # noqa: E402

BENCH_SAMPLERS = ("tpe", "nsga2", "random", "gp")


def sampler_options(sampler: str, startup: int) -> dict:
    """The same number of random start-up trials for every sampler."""
    return {"tpe": {"n_startup_trials": startup}, "gp": {"n_startup_trials": startup},
            "nsga2": {"population_size": startup}}.get(sampler, {})


def grid_values(p, n: int) -> list:
    """n values over a searched knob (log-spaced on a log scale), or every choice of a categorical one."""
    if p.kind == "categorical":
        return list(p.choices)
    if p.grid:
        return list(p.grid)
    vals = np.geomspace(p.low, p.high, n) if p.log else np.linspace(p.low, p.high, n)
    if p.kind == "int":
        return sorted({int(round(v)) for v in vals})
    return [float(f"{v:.6g}") for v in vals]


def write_study(path: Path, raw: dict, **changes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**raw, **changes}, sort_keys=False))
    return path


def run_sweep(study_file: Path, out: Path, workers: int, tracking_uri: str) -> tuple[float, float]:
    """`sweep.sweep` on the study file in a fresh interpreter (as `rlhf-sweep sweep` runs it, without the
    report); returns (start, end) as epoch seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sweep-one", str(study_file), str(out), str(workers), tracking_uri]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=os.getcwd(), capture_output=True, text=True)
    t1 = time.time()
    if r.returncode != 0:
        sys.exit(f"sweep of {study_file} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return t0, t1


def sweep_one(study_file: str, out: str, workers: str, tracking_uri: str) -> None:
    from rlhf_sweep.study import sweep

    res = sweep.sweep(study_file, workers=int(workers), storage=str(Path(out) / "optuna.journal"), tracking_uri=tracking_uri,
                      out=out, progress=False, baseline=False)
    if res.n_complete < res.n_trials:
        sys.exit(f"{study_file}: {res.n_complete} of {res.n_trials} trials complete ({res.n_failed} failed)")


def warm_cache(spec, workers: int) -> None:
    """The SFT reference and RM the trials will load (their cache keys hold the thread count), built now if cold,
    so that no timed run pays for them."""
    code = ("import sys; from rlhf_sweep.run import pipeline; from rlhf_sweep.config.compose import compose; from rlhf_sweep.simulation.world import World\n"
            "from rlhf_sweep.utils.runtime import cores\n"
            f"for seed in {spec.seeds!r}:\n"
            f"    cfg = compose({spec.fixed_overrides()!r} + [f'seed={{seed}}', 'progress=false'])\n"
            f"    cfg.threads = max(1, cores() // {workers})\n"
            "    dev = pipeline.pick_device(cfg.device); w = World(cfg.world)\n"
            "    ref, _ = pipeline.get_reference(cfg, w, dev, print)\n"
            "    pipeline.get_reward_model(cfg, w, ref, dev, print)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"warming the SFT/RM cache failed:\n{r.stderr[-3000:]}")


def completed(journal: Path, name: str, t0: float) -> list[dict]:
    """The complete trials of a stored study in completion order: values, feasibility, minutes since t0."""
    import optuna
    from optuna.trial import TrialState

    from rlhf_sweep.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (t.datetime_complete, t.number))
    return [{"number": t.number, "values": list(t.values), "params": t.params,
             "feasible": all(v <= 0 for v in (t.constraints or {}).values()),
             "metrics": {k: v for k, v in (t.user_attrs.get("metrics") or {}).items() if "/" in k and not k.startswith("ppo/")},
             "seconds": t.user_attrs.get("seconds"), "minutes": (t.datetime_complete.timestamp() - t0) / 60} for t in done]


def run_grid(spec, raw: dict, shape: list[int], out: Path, workers: int, uri: str) -> list[dict]:
    values = {p.name: grid_values(p, n) for p, n in zip(spec.space, shape, strict=True)}
    # a categorical knob's choices are its grid already
    space = {p.name: raw["space"][p.name] if p.kind == "categorical" else {**raw["space"][p.name], "grid": values[p.name]}
             for p in spec.space}
    size = math.prod(len(v) for v in values.values())
    tag = "x".join(str(len(v)) for v in values.values())
    gdir = out / f"grid-{tag}"
    study_file = write_study(gdir / f"{spec.name}-grid.yaml", raw, space=space, sampler="grid", sampler_options={}, n_trials=size)
    print(f"reference grid {tag} ({size} trials) in {gdir}", flush=True)
    t0, t1 = run_sweep(study_file, gdir, workers, uri)  # a cached grid: nothing to run
    trials = completed(gdir / "optuna.journal", study_file.stem, t0)
    print(f"  {len(trials)} complete trials ({(t1 - t0) / 60:.1f} min this time)", flush=True)
    return trials


def run_sampler(spec, raw: dict, sampler: str, seed: int, startup: int, out: Path, workers: int, uri: str) -> dict:
    rdir = out / "runs" / f"{sampler}-s{seed}"
    record = rdir / "run.json"
    if record.is_file():
        rec = json.loads(record.read_text())
        if rec["workers"] == workers and rec["n_trials"] == spec.n_trials and rec["options"] == sampler_options(sampler, startup):
            return rec
    shutil.rmtree(rdir, ignore_errors=True)  # an unfinished or different run: its clock means nothing
    study_file = write_study(rdir / f"{spec.name}-{sampler}-s{seed}.yaml", raw, sampler=sampler, sampler_seed=seed,
                             sampler_options=sampler_options(sampler, startup))
    print(f"{sampler} seed {seed}: {spec.n_trials} trials, {workers} workers ...", end=" ", flush=True)
    t0, t1 = run_sweep(study_file, rdir, workers, uri)
    rec = {"sampler": sampler, "seed": seed, "workers": workers, "n_trials": spec.n_trials, "options": sampler_options(sampler, startup),
           "wall_minutes": (t1 - t0) / 60, "load_average": os.getloadavg()[0],
           "trials": completed(rdir / "optuna.journal", study_file.stem, t0)}
    record.write_text(json.dumps(rec))
    print(f"{rec['wall_minutes']:.1f} min", flush=True)
    return rec


def summarize(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) over seeds; a seed that never got there counts as worse than all that did."""
    if not values:
        return None, None, None
    v = np.array([math.inf if x is None else x for x in values], dtype=float)
    med = float(np.median(v))
    return (med if math.isfinite(med) else None), float(v.min()) if math.isfinite(v.min()) else None, \
        float(v.max()) if math.isfinite(v.max()) else None


def fmt_range(med, lo, hi, unit: str = "", digits: int = 1) -> str:
    def f(x):
        return "never" if x is None else f"{x:.{digits}f}{unit}"

    return f"{f(med)} [{f(lo)}, {f(hi)}]"


def compare(runs: dict[str, list[dict]], key: str, base: str, lower_is_better: bool = True) -> dict[str, float | None]:
    """One-sided Mann-Whitney U p-values over seeds: is each sampler's `key` better than `base`'s?
    A seed that never reached the share (None) ranks worst."""
    from scipy.stats import mannwhitneyu

    def vals(s):
        return [math.inf if r[key] is None else r[key] for r in runs[s]]

    out = {}
    for s in runs:
        if s != base and base in runs:
            a, b = vals(s), vals(base)
            out[s] = None if sorted(a) == sorted(b) else float(mannwhitneyu(a, b, alternative="less" if lower_is_better else "greater").pvalue)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="beta_clip_frontier", help="a study name in studies/ or a YAML path")
    ap.add_argument("--samplers", default=",".join(BENCH_SAMPLERS))
    ap.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..N-1 per sampler")
    ap.add_argument("--grid", default="12x6", help="grid points per searched float/int knob, in the space's order")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per sweep (the grid too)")
    ap.add_argument("--startup", type=int, default=8, help="random start-up trials of every sampler")
    ap.add_argument("--share", type=float, default=0.9, help="the share of the reference hypervolume to reach")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "frontier"))
    ap.add_argument("--sweep-one", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sweep_one:
        sweep_one(*a.sweep_one)
        return

    spec = load_spec(a.study)
    if len(spec.objectives) != 2:
        sys.exit(f"{spec.name}: the frontier bench needs two objectives, the study has {len(spec.objectives)}")
    samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
    bad = [s for s in samplers if s not in SAMPLERS or s == "grid"]
    if bad:
        sys.exit(f"--samplers: {bad[0]!r} is not one of {', '.join(BENCH_SAMPLERS)}")
    shape = [int(x) for x in a.grid.lower().split("x")]
    if len(shape) != len(spec.space) or min(shape) < 2:
        sys.exit(f"--grid: give {len(spec.space)} counts >= 2 joined by 'x' ({', '.join(p.name for p in spec.space)}), got {a.grid!r}")
    raw = yaml.safe_load(find_study_file(a.study).read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    print(f"frontier bench: study {spec.name}, {spec.n_trials} trials per run, samplers {', '.join(samplers)}, seeds 0..{a.seeds - 1}, "
          f"{a.workers} workers, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)

    grid = run_grid(spec, raw, shape, out, a.workers, uri)
    warm_cache(spec, a.workers)
    reference, sources = hypervolume.study_reference(spec, [t["metrics"] for t in grid])
    directions = spec.directions

    def points(trials):
        return [t["values"] if t["feasible"] else [math.nan] * len(directions) for t in trials]

    ref_hv = hypervolume.hypervolume(points(grid), reference, directions)
    if not ref_hv > 0:
        sys.exit(f"the grid's front has no hypervolume against the reference point {reference}: nothing to measure shares of")
    print(f"reference point {dict(zip([o.metric for o in spec.objectives], reference, strict=True))} ({'; '.join(sources)}); "
          f"grid hypervolume {ref_hv:.4g}", flush=True)

    runs: dict[str, list[dict]] = {s: [] for s in samplers}
    for seed in range(a.seeds):
        for s in samplers:
            rec = run_sampler(spec, raw, s, seed, a.startup, out, a.workers, uri)
            share = hypervolume.hypervolume_history(points(rec["trials"]), reference, directions) / ref_hv
            k = hypervolume.trials_to_share(share, 1.0, a.share)
            k_all = hypervolume.trials_to_share(share, 1.0, 1.0)
            minutes = [t["minutes"] for t in rec["trials"]]
            runs[s].append({"seed": seed, "share": share.tolist(), "minutes": minutes, "trials_to": k,
                            "minutes_to": minutes[k - 1] if k else None, "trials_to_grid": k_all,
                            "minutes_to_grid": minutes[k_all - 1] if k_all else None, "final_share": float(share[-1]),
                            "wall_minutes": rec["wall_minutes"], "trial_seconds": float(np.mean([t["seconds"] for t in rec["trials"]]))})

    from rlhf_sweep.reporting import plots

    fig = plots.frontier_bench({s: [{"share": r["share"], "minutes": r["minutes"]} for r in rs] for s, rs in runs.items()},
                               out / "frontier.png", share=a.share,
                               title=f"{spec.name}: hypervolume share of the {a.grid} grid's front, {spec.n_trials} trials, "
                                     f"{a.workers} workers (median over {a.seeds} seeds, band: min to max)")
    rows, result = [], {}
    base = spec.sampler  # the study's own sampler: is another one better?
    p_min = compare(runs, "minutes_to", base)
    p_trials = compare(runs, "trials_to", base)
    p_final = compare(runs, "final_share", base, lower_is_better=False)

    def p_text(p: dict, s: str) -> str:
        return "" if p.get(s) is None else f"{p[s]:.2f}"

    for s, rs in runs.items():
        t = summarize([r["trials_to"] for r in rs])
        m = summarize([r["minutes_to"] for r in rs])
        g = summarize([r["trials_to_grid"] for r in rs])
        f = summarize([r["final_share"] for r in rs])
        w = summarize([r["wall_minutes"] for r in rs])
        rows.append([s, f"{sum(r['trials_to'] is not None for r in rs)}/{len(rs)}", fmt_range(*t, digits=0), fmt_range(*m),
                     f"{sum(r['trials_to_grid'] is not None for r in rs)}/{len(rs)}: " + fmt_range(*g, digits=0),
                     fmt_range(*f, digits=2), fmt_range(*w), f"{np.mean([r['trial_seconds'] for r in rs]):.1f}",
                     p_text(p_min, s), p_text(p_final, s)])
        result[s] = {"trials_to_share": [r["trials_to"] for r in rs], "minutes_to_share": [round(r["minutes_to"], 2) if r["minutes_to"] else None for r in rs],
                     "median_trials_to_share": t[0], "median_minutes_to_share": None if m[0] is None else round(m[0], 2),
                     "trials_to_grid": [r["trials_to_grid"] for r in rs],
                     "minutes_to_grid": [round(r["minutes_to_grid"], 2) if r["minutes_to_grid"] else None for r in rs],
                     "final_share": [round(r["final_share"], 3) for r in rs], "wall_minutes": [round(r["wall_minutes"], 2) for r in rs],
                     f"p_minutes_below_{base}": p_min.get(s), f"p_trials_below_{base}": p_trials.get(s),
                     f"p_final_share_above_{base}": p_final.get(s)}
    print(format_table(["sampler", f"reached {a.share:.0%}", "trials to it: median [min, max]", "minutes to it",
                        "reached 100%: trials to it", f"share after {spec.n_trials}", "wall minutes per run", "s per trial (worker)",
                        f"p: minutes < {base}'s", f"p: share > {base}'s"], rows,
                       title=f"\n{spec.name}, {spec.n_trials} trials per run, {a.workers} workers, seeds 0..{a.seeds - 1}: hypervolume "
                             f"share of the {a.grid} grid's front ({len(grid)} trials, hypervolume {ref_hv:.4g})"))
    print(f"figure: {fig}\np: one-sided Mann-Whitney U over seeds against the study's sampler ({base}); a seed that never "
          "reached the share ranks last. Every sampler's start-up trials are the same random draws for the same seed.")
    summary = {"study": spec.name, "n_trials": spec.n_trials, "workers": a.workers, "seeds": a.seeds, "startup": a.startup,
               "grid": a.grid, "grid_trials": len(grid), "reference_point": reference, "reference_hypervolume": round(ref_hv, 6),
               "share": a.share, "samplers": result}
    (out / "frontier.json").write_text(json.dumps({**summary, "runs": runs}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
