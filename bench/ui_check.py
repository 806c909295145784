"""Does a study show up where researchers look? Runs the smoke study, starts `rlhf-sweep ui` (optuna-dashboard
and the MLflow UI on loopback), opens both in headless Chromium and saves four screenshots:

  optuna_pareto_front.png      optuna-dashboard's page of the study: its Pareto front of gold/policy against kl/exact
  mlflow_study_runs.png        the MLflow experiment: the study's parent run expanded into its nested trial runs
  mlflow_trial_gold_kl.png     one nested trial run's per-iteration gold and kl/exact chart
  mlflow_report_artifacts.png  the parent run's artifacts: the report figures, pareto.png open

It fails (exit 1, naming the page) if a page shows an error or none of the study's runs. Not part of the
test suite: CI has no browser. Needs Debian's chromium and chromium-driver (apt-get install -y chromium
chromium-driver) and the ui and bench extras (selenium drives /usr/bin/chromedriver; nothing is downloaded).

    python bench/ui_check.py [--out outputs/bench/ui_check] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# what Chromium needs on a machine with no network but loopback, as root (see the README's "Dashboards")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1100"]
ERROR_TEXTS = ("Error while loading", "Something went wrong", "Resource not found", "Failed to fetch", "Internal Server Error",
               "Traceback", "Page not found")
WAIT_S = 90


class CheckFailed(RuntimeError):
    pass


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_sweep", *args]


def api(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def body_text(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.TAG_NAME, "body").text


def wait_for(d, what: str, ok, timeout: float = WAIT_S) -> None:
    """Poll until ok(d) holds; fail with the page's error text, or with `what`, when it does not."""
    deadline = time.monotonic() + timeout
    while True:
        text = body_text(d)
        bad = [e for e in ERROR_TEXTS if re.search(rf"\b{re.escape(e)}\b", text)]
        if bad:
            raise CheckFailed(f"{d.current_url}: the page shows {bad[0]!r}: {' '.join(text.split())[:300]}")
        try:
            if ok(d):
                return
        except Exception:  # an element not rendered yet
            pass
        if time.monotonic() > deadline:
            raise CheckFailed(f"{d.current_url}: {what} did not appear within {timeout:.0f} s; the page says: "
                              f"{' '.join(text.split())[:300]}")
        time.sleep(1.0)


def dismiss_mlflow_panels(d) -> None:
    """Close the MLflow Assistant side panel and first-visit hints, which cover the page."""
    d.execute_script("""for (const b of document.querySelectorAll('button[aria-label="Close"], button[aria-label="Close guidance"]'))
                          { try { b.click(); } catch (e) {} }""")
    time.sleep(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "ui_check"), help="work directory and screenshots")
    ap.add_argument("--keep", action="store_true", help="reuse the study already swept in --out (default: start clean)")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    work = out / "work"
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            print(f"ui_check: {tool} is missing; apt-get install -y chromium chromium-driver", file=sys.stderr)
            return 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if not a.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if not (work / "outputs" / "studies" / "smoke" / "report.md").exists():
        r = subprocess.run(cli("sweep", "smoke"), cwd=work, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
            print("ui_check: the smoke study failed", file=sys.stderr)
            return 1
    print(f"smoke study: {work / 'outputs' / 'studies' / 'smoke'} ({time.perf_counter() - t0:.0f} s)")

    ui = subprocess.Popen(cli("ui", "--optuna-port", "0", "--mlflow-port", "0"), cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    profile = out / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    d = None
    try:
        lines = []
        for line in ui.stdout:
            print("  ui: " + line.rstrip())
            lines.append(line)
            if "Ctrl-C stops both" in line:
                break
        if ui.poll() is not None:
            raise CheckFailed("rlhf-sweep ui did not start: " + "".join(lines)[-500:])
        urls = {ln.split(":", 1)[0]: next(w for w in ln.split() if w.startswith("http")) for ln in lines
                if ln.startswith(("optuna-dashboard:", "MLflow UI:"))}
        optuna_url, mlflow_url = urls["optuna-dashboard"], urls["MLflow UI"]

        # what the servers hold, through their own APIs: the page checks below compare against it
        study_id = next(s["study_id"] for s in api(f"{optuna_url}/api/studies")["study_summaries"] if s["study_name"] == "smoke")
        exp_id = api(f"{mlflow_url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=rlhf-sweep")["experiment"]["experiment_id"]
        runs = api(f"{mlflow_url}/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 500})["runs"]

        def tag(r, key):
            return next((t["value"] for t in r["data"].get("tags", []) if t["key"] == key), None)

        parent = next(r for r in runs if tag(r, "rlhf_sweep.role") == "study" and tag(r, "study") == "smoke")
        trials = sorted((r for r in runs if tag(r, "rlhf_sweep.role") == "trial" and tag(r, "study") == "smoke"),
                        key=lambda r: r["info"]["run_name"])
        if not trials:
            raise CheckFailed("the MLflow store has no trial runs of the smoke study")
        parent_id = parent["info"]["run_id"]
        shots = {}
        d = browser(profile)
        from selenium.webdriver.common.by import By

        # 1. optuna-dashboard: the study's page, with its Pareto front
        d.get(f"{optuna_url}/dashboard/studies/{study_id}")
        wait_for(d, "the Pareto front of gold/policy and kl/exact with the study's trials",
                 lambda d: "Pareto Front" in body_text(d) and "kl/exact" in body_text(d) and d.execute_script(
                     "return document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length") >= len(trials))
        time.sleep(2)
        shots["optuna_pareto_front"] = out / "optuna_pareto_front.png"
        d.save_screenshot(str(shots["optuna_pareto_front"]))

        # 2. MLflow: the experiment's runs, the study's parent expanded into its nested trial runs
        d.get(f"{mlflow_url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        wait_for(d, "the study's parent run", lambda d: d.find_element(By.LINK_TEXT, parent["info"]["run_name"]))
        dismiss_mlflow_panels(d)
        link = d.find_element(By.LINK_TEXT, parent["info"]["run_name"])
        cell = link.find_element(By.XPATH, "./ancestor::div[contains(@class, 'ag-cell')][1]")
        cell.find_element(By.TAG_NAME, "button").click()  # the +/- expander of a run with nested runs
        names = [t["info"]["run_name"] for t in trials]
        wait_for(d, f"the nested trial runs {', '.join(names)}", lambda d: all(n in body_text(d) for n in names))
        time.sleep(2)
        shots["mlflow_study_runs"] = out / "mlflow_study_runs.png"
        d.save_screenshot(str(shots["mlflow_study_runs"]))

        # 3. one nested trial run's per-iteration gold and kl/exact
        trial = trials[0]
        q = urllib.parse.urlencode({"runs": json.dumps([trial["info"]["run_id"]]), "metric": json.dumps("gold"),
                                    "experiments": json.dumps([exp_id]), "plot_metric_keys": json.dumps(["gold", "kl/exact"]),
                                    "x_axis": "step", "show_point": "true"})
        d.get(f"{mlflow_url}/#/metric?{q}")
        wait_for(d, "the gold and kl/exact chart with its table",
                 lambda d: re.search(r"^gold -?\d", body_text(d), re.M) and re.search(r"^kl/exact -?\d", body_text(d), re.M)
                 and d.execute_script("return document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length") >= 2)
        dismiss_mlflow_panels(d)
        time.sleep(2)
        shots["mlflow_trial_gold_kl"] = out / "mlflow_trial_gold_kl.png"
        d.save_screenshot(str(shots["mlflow_trial_gold_kl"]))

        # 4. the parent run's artifacts: the report's figures, pareto.png shown
        d.get(f"{mlflow_url}/#/experiments/{exp_id}/runs/{parent_id}/artifacts/report/pareto.png?workflowType=machine_learning")
        figures = ["pareto.png", "overoptimization.png", "length_filler.png", "slices.png", "report.md"]
        wait_for(d, f"the report's files {', '.join(figures)} and pareto.png's image",
                 lambda d: all(f in body_text(d) for f in figures) and d.execute_script(
                     "return Array.from(document.images).some(i => i.complete && i.naturalWidth > 600)"))
        dismiss_mlflow_panels(d)
        time.sleep(2)
        shots["mlflow_report_artifacts"] = out / "mlflow_report_artifacts.png"
        d.save_screenshot(str(shots["mlflow_report_artifacts"]))
    except CheckFailed as e:
        print(f"ui_check: FAILED: {e}", file=sys.stderr)
        if d is not None:
            d.save_screenshot(str(out / "failed.png"))
            print(f"ui_check: the page as it was: {out / 'failed.png'}", file=sys.stderr)
        return 1
    finally:
        if d is not None:
            d.quit()
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)
            ui.wait(timeout=60)
    for name, path in shots.items():
        print(f"{name}: {path}")
    print(f"ui_check: ok, {len(trials)} trial runs under parent {parent_id}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
