"""compare-fixes' outputs: the terminal tables, `fixes.md`, the figure `fixes.png`, and the comparison's tags,
metrics and files on the study's MLflow parent run. They read the result `compare.compare` builds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from rlhf_sweep.fixes.racing import INTERVAL
from rlhf_sweep.fixes.spec import DECIDE_ON, METRICS, FixesSpec, arm_overrides
from rlhf_sweep.reporting import plots
from rlhf_sweep.run import tracking
from rlhf_sweep.utils.tables import format_table, md_table


def ci_text(d: dict, digits: int = 3) -> str:
    if not (math.isfinite(d["lo"]) and math.isfinite(d["hi"])):
        return f"{d['mean']:+.{digits}f} [n/a]"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def _status(result: dict, arm: str) -> str:
    r = result["racing"]
    if arm in result["recommended"]:
        return "recommended"
    if arm in r["out"]:
        return "out: " + r["out"][arm]
    if arm in r["sure"]:
        return "in the top two"
    return "in contention"


def gold_table(spec: FixesSpec, result: dict, arms_key: str = "arms") -> tuple[list[str], list[list[str]]]:
    src = result[arms_key] if arms_key == "arms" else result["confirmation"]["arms"]
    headers = ["arm", "seeds", "d gold mean [interval]", "IQM d", "P(> base)"]
    if arms_key == "arms":
        headers += ["p Holm", "racing"]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            rows.append([f"{arm} (mean gold)", str(len(row["seeds"])), f"{row['mean'][DECIDE_ON]:.3f}", "", ""]
                        + (["", ""] if arms_key == "arms" else []))
            continue
        d = row["diff"][DECIDE_ON]
        r = [arm, str(d["n"]), ci_text(d), f"{d['iqm']:+.3f}", f"{d['p_improve']:.2f}"]
        if arms_key == "arms":
            r += [f"{result['racing']['p_holm_vs_baseline'][arm]:.2g}", _status(result, arm)]
        rows.append(r)
    return headers, rows


def diff_table(spec: FixesSpec, src: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", *(f"d {label}" for _k, label, _s in METRICS[1:])]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            rows.append([f"{arm} (mean)", *(f"{row['mean'][k]:.3f}" for k, _l, _s in METRICS[1:])])
        else:
            rows.append([arm, *(ci_text(row["diff"][k]) for k, _l, _s in METRICS[1:])])
    return headers, rows


def cost_table(spec: FixesSpec, src: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "side", "d RM acc labels", "d RM acc gold", "proxy given up", "extra CPU s/run"]
    rows = []
    for arm, row in src.items():
        if arm == spec.baseline:
            continue
        side = ("RM" if row["rm_side"] else "PPO") + (f", {row['ensemble_size']} RMs" if row["ensemble_size"] > 1 else "")
        d = row["diff"]
        rows.append([arm, side, ci_text(d["rm/acc_labels"]), ci_text(d["rm/acc_gold"]),
                     f"{-d['rm/policy']['mean']:+.3f}", f"{row['extra_seconds_per_run']:+.1f}"])
    return headers, rows


def runs_line(result: dict) -> str:
    r = result["racing"]
    line = (f"runs: {r['runs']} to select ({r['looks']} looks, up to {r['n_seeds']} seeds; every arm on every one of those seeds "
            f"would be {r['runs_every_arm_every_seed']})")
    if result["confirmation"]:
        line += f" + {result['confirmation']['runs']} to confirm"
    return line


def interval_words(spec: FixesSpec) -> str:
    return (f"mean [{spec.confidence:.0%} Student-t interval over seeds, per arm]; IQM d: interquartile mean of the per-seed differences; P(> base): share of seeds where the arm beats the baseline; "
            f"p Holm: paired t-test against the baseline, Holm-adjusted across the {len(spec.singles)} single fixes")


def terminal_table(spec: FixesSpec, result: dict) -> str:
    seeds = result["arms"][spec.baseline]["seeds"]
    h, r = gold_table(spec, result)
    lines = [format_table(h, r, title=f"selection: each fix minus {spec.baseline} in gold, paired by seed (seeds {_span(seeds)}); "
                                       + interval_words(spec))]
    h, r = diff_table(spec, result["arms"])
    lines += ["", format_table(h, r, title=f"selection: other metrics, mean [{spec.confidence:.0%} t interval]")]
    h, r = cost_table(spec, result["arms"])
    lines += ["", format_table(h, r, title="costs")]
    if result["confirmation"]:
        h, r = gold_table(spec, result, "confirmation")
        lines += ["", format_table(h, r, title=f"confirmation on held-out seeds {_span(result['confirmation']['seeds'])} "
                                                "(not used to choose): each arm minus the baseline in gold")]
        h, r = diff_table(spec, result["confirmation"]["arms"])
        lines += ["", format_table(h, r, title="confirmation: other metrics")]
    lines += ["", runs_line(result), result["verdict"]]
    if result["confirmation"]:
        lines.append(confirmation_line(spec, result))
    return "\n".join(lines)


def _span(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ",".join(map(str, seeds))


def confirmation_line(spec: FixesSpec, result: dict) -> str:
    c = result["confirmation"]
    parts = []
    for arm, row in c["arms"].items():
        if arm == spec.baseline:
            continue
        d = row["diff"][DECIDE_ON]
        holds = "holds" if d["lo"] > 0 else "not confirmed" if d["mean"] <= 0 else "positive, interval spans 0"
        parts.append(f"{arm} {ci_text(d)} ({holds})")
    return f"held out ({len(c['seeds'])} seeds): " + "; ".join(parts)


def trade_off(spec: FixesSpec, src: dict, arm: str) -> str:
    r, b = src[arm], src[spec.baseline]
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
    r = result["racing"]
    lines = [
        "# Which fixes? A raced comparison against the baseline, confirmed on held-out seeds",
        "",
        f"**{result['verdict']}**",
        "",
        *( [f"**{confirmation_line(spec, result)}**", ""] if result["confirmation"] else []),
        f"Seed pool from {spec.first_seed}: selection seeds {_span(spec.selection_seeds)} (every arm on the first {spec.seeds}, then "
        f"{spec.seeds_per_round} more per look for the fixes still in contention), held-out confirmation seeds {_span(spec.held_out_seeds)}. "
        f"Budget {spec.budget_minutes:g} min; stopped: {r['stopped']}{(' (' + result['budget_refused'] + ')') if result.get('budget_refused') else ''}. "
        f"{runs_line(result)}. Wall time of this invocation: {wall_s / 60:.1f} min, {result['runs_this_invocation']} runs made now "
        f"({spec.workers} workers; runs already in the output directory are reused).",
        "",
        "How to read it: differences are arm minus baseline on the same seed. Intervals: "
        f"{spec.confidence:.0%} {INTERVAL}, one per arm and metric. IQM d: interquartile mean of the per-seed differences "
        "(scipy.stats.trim_mean, 25% cut each side). P(> base): the share of seeds on which the arm's gold beats the "
        "baseline's (ties half). p Holm: two-sided paired t-test against the baseline, Holm-adjusted across the single "
        f"fixes (statsmodels). Racing: an arm is out once two others beat it (paired t-tests, Holm across all pairs of single "
        f"fixes, alpha {spec.alpha}) or once it is worse than the baseline; the pair is recommended when exactly two are left "
        "and both beat the baseline. The confirmation scores the pair, its combination and any combinations asked for on seeds "
        "that took no part in choosing them.",
        "",
        "## Arms",
        "",
        *(f"- `{a}`: `{' '.join(arm_overrides(a))}`" for a in [*result["arms"], *result.get("confirmation", {}).get("arms", {})] if a),
        "",
        "## Selection: gold",
        "",
        md_table(*gold_table(spec, result)),
        "",
        "## Selection: other metrics",
        "",
        md_table(*diff_table(spec, result["arms"])),
        "",
        "## Costs",
        "",
        "RM accuracy is on held-out labeled pairs; 'proxy given up' is the drop in the arm's own RM score "
        "(for RM-side arms that is another RM's scale); extra CPU seconds per run are PPO + evaluation against the "
        "baseline, plus RM training for RM-side arms (CPU time, so other processes sharing the cores do not inflate it).",
        "",
        md_table(*cost_table(spec, result["arms"])),
        "",
    ]
    if result["confirmation"]:
        c = result["confirmation"]
        lines += ["## Confirmation on held-out seeds", "", f"Seeds {_span(c['seeds'])}, not used to choose.", "",
                  md_table(*gold_table(spec, result, "confirmation")), "", md_table(*diff_table(spec, c["arms"])), ""]
        for arm in c["arms"]:
            if arm != spec.baseline:
                lines.append(f"- **{arm}** (held out): {trade_off(spec, c['arms'], arm)}")
        lines.append("")
    lines += ["## Per seed", ""]
    rows = []
    for src, tag in ((result["arms"], ""), (result.get("confirmation", {}).get("arms", {}), " (held out)")):
        for a, row in src.items():
            for k in ("gold/policy", "kl/exact", "len/policy"):
                rows.append([a + tag, k, " ".join(f"{s}:{v:.3f}" for s, v in zip(row["seeds"], row["per_seed"][k], strict=True))])
    lines.append(md_table(["arm", "metric", "seed:value"], rows))
    if figure:
        lines += ["", f"![arms x metrics]({figure})"]
    path.write_text("\n".join(lines) + "\n")


def draw_figure(spec: FixesSpec, result: dict, summaries: dict, path: Path) -> str:
    """fixes.png: each arm's paired differences against the baseline per metric, and its runs on KL x gold."""
    diffs = {a: r["diff"] for a, r in result["arms"].items() if a != spec.baseline}
    points = {a: [(summaries[a][s]["metrics"]["kl/exact"], summaries[a][s]["metrics"]["gold/policy"]) for s in r["seeds"]]
              for a, r in result["arms"].items()}
    for a, r in (result.get("confirmation") or {}).get("arms", {}).items():
        if a != spec.baseline:
            diffs[f"{a} (held out)"] = r["diff"]
            points[f"{a} (held out)"] = [(summaries[a][s]["metrics"]["kl/exact"], summaries[a][s]["metrics"]["gold/policy"]) for s in r["seeds"]]
    base_seeds = result["arms"][spec.baseline]["seeds"]
    ref_gold = float(np.mean([summaries[spec.baseline][s]["metrics"]["gold/ref"] for s in base_seeds]))
    title = f"Each fix minus the baseline, paired by seed: mean and {spec.confidence:.0%} t interval (filled: excludes 0)"
    return plots.fixes_figure(diffs, [(k, label) for k, label, _s in METRICS], points, path, ref_gold, title=title)


def log_mlflow(uri: str, parent: str, spec: FixesSpec, result: dict, files: list[Path]) -> None:
    """The comparison on the study's parent run (its nested runs are the arm x seed trials)."""
    from mlflow.entities import Metric  # mlflow loads in seconds: only a comparison that logs to it pays that

    client = tracking.client_for(uri)
    now = int(time.time() * 1000)
    # tags, not params: the parent run outlives one invocation, and MLflow refuses a param whose value changes
    tags = {"rlhf_sweep.kind": "compare-fixes", "arms": ",".join(spec.arms), "first_seed": str(spec.first_seed),
            "budget_minutes": f"{spec.budget_minutes:g}", "baseline": spec.baseline,
            "recommended": ",".join(result["recommended"]) or "none", "verdict": result["verdict"][:5000]}
    metrics = []
    for tag, src in (("", result["arms"]), ("heldout/", (result["confirmation"] or {}).get("arms", {}))):
        for arm, row in src.items():
            name = tag + arm.replace("+", "-plus-")  # MLflow metric names may not contain '+'
            for key, d in row["diff"].items():
                metrics += [Metric(f"{name}/d_{key}", d["mean"], now, 0), Metric(f"{name}/d_{key}_lo", d["lo"], now, 0),
                            Metric(f"{name}/d_{key}_hi", d["hi"], now, 0)]
            metrics.append(Metric(f"{name}/extra_seconds_per_run", row["extra_seconds_per_run"], now, 0))
    metrics = [m for m in metrics if math.isfinite(m.value)]
    for k, v in tags.items():
        client.set_tag(parent, k, v)
    for chunk in tracking.chunks(metrics, tracking.MAX_METRICS_PER_CALL):
        client.log_batch(parent, metrics=chunk)
    for f in files:
        if f.exists():
            client.log_artifact(parent, str(f))
