"""Screenshots of a sweep in MLflow's UI for docs/demo.md (not run by CI).

Starts MLflow's tracking server (bound to 127.0.0.1) over a sweep's store, opens the experiment's runs table, the sweep's
parent run and one trial in headless Chromium (Debian's ``chromium``, driven by Playwright), and saves PNGs.

    .venv/bin/pip install playwright   # the driver only: Playwright's own browser download is never used
    .venv/bin/python scripts/screenshots.py flat_ray_work/sweeps/SWEEP docs/images
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow tracking server at {url} did not come up")


def click_if_there(page, locator) -> None:
    try:
        locator.first.click(timeout=3000)
    except Exception:  # noqa: BLE001 - optional UI chrome that this MLflow version may not have
        pass


def shoot(page, url: str, path: Path, wait_for: str, expand: bool = False) -> None:
    page.goto(url)
    page.wait_for_selector(f"text={wait_for}", timeout=60_000)
    click_if_there(page, page.get_by_text("Model training", exact=True))  # the UI's ML (not GenAI) mode
    click_if_there(page, page.locator("[aria-label='Close assistant'], [aria-label='Close']"))
    if expand:  # the sweep's parent row opens onto its trials
        click_if_there(page, page.locator("[role='row']", has_text=wait_for).locator("button"))
    page.wait_for_timeout(2500)  # charts and images finish drawing
    page.screenshot(path=str(path))
    print(f"saved {path}")


def main(sweep_dir: str, out_dir: str) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    state = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    client = MlflowClient(state["mlflow_uri"])
    parent = client.get_run(state["parent_run_id"])
    exp = parent.info.experiment_id
    child = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                               order_by=["metrics.`eval/unlearn_score` DESC"], max_results=1)[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", state["mlflow_uri"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            shoot(page, f"{url}/#/experiments/{exp}/runs", out / "mlflow_runs.png", parent.info.run_name, expand=True)
            page.locator("label:has(input[value='CHART'])").click()  # the chart view of the same runs
            page.wait_for_timeout(4000)
            page.screenshot(path=str(out / "mlflow_charts.png"))
            print(f"saved {out / 'mlflow_charts.png'}")
            shoot(page, f"{url}/#/experiments/{exp}/runs/{parent.info.run_id}", out / "mlflow_sweep_run.png",
                  "Description")
            shoot(page, f"{url}/#/experiments/{exp}/runs/{child.info.run_id}/artifacts/plots/training_curves.png",
                  out / "mlflow_trial_curves.png", "training_curves.png")
            shoot(page, f"{url}/#/experiments/{exp}/runs/{child.info.run_id}/system-metrics",
                  out / "mlflow_trial_system_metrics.png", "cpu_utilization")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
