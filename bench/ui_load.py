"""The UI's first load in Chromium, and where its time goes: prints figures, asserts nothing.

    eval "$(./show_all.sh --client-env)" && .venv/bin/python bench/ui_load.py [--loads 3] [--experiment NAME]

Each load is a new browser context (an empty cache, as a colleague's first visit) that opens
the experiments page and waits until the experiment NAME (default: the first one the server
lists) is shown. Printed per load, then as medians: the time to that row; when the last script
or style arrived (responseEnd), DOMContentLoaded and the load event; the bytes on the wire
(transferSize) and unpacked (decodedBodySize) of the scripts and styles; the slowest of them
with its time waiting for the first byte (the server's and nginx's part) and receiving it; and
the main thread's busy time in that window (Chromium's TaskDuration: scripts, style, layout,
paint and garbage collection) and the part of it spent running scripts (ScriptDuration).

A load whose requests Chromium aborted with ERR_NETWORK_CHANGED (an address on a host interface
changed, e.g. Docker made a network for another stack) is measured again, up to 3 times.

Drives Debian's chromium (/usr/bin/chromium) through Playwright, as the browser test does.
The stack's certificate is trusted by ignoring certificate errors here: this measures time,
not trust (the browser test checks the certificate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import requests
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def first_experiment(base: str, auth) -> str:
    answer = requests.post(base + "/api/2.0/mlflow/experiments/search", json={"max_results": 1}, auth=auth,
                           timeout=60)
    answer.raise_for_status()
    return answer.json()["experiments"][0]["name"]


class NetworkChanged(Exception):
    pass


def one_load(browser, base: str, auth, name: str) -> tuple[dict[str, float], str]:
    context = browser.new_context(http_credentials={"username": auth[0], "password": auth[1]} if auth else None,
                                  ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        aborted = []
        page.on("requestfailed", lambda request: aborted.append(request.failure or ""))
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        busy_before = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        started = time.perf_counter()
        try:
            page.goto(base + "/#/experiments")
            page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=120_000)
        except Exception:
            if any("ERR_NETWORK_CHANGED" in failure for failure in aborted):
                raise NetworkChanged() from None
            raise
        shown = (time.perf_counter() - started) * 1000
        busy_after = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        timing = page.evaluate("""() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const assets = performance.getEntriesByType('resource')
                .filter(r => r.initiatorType === 'script' || r.initiatorType === 'link' || /\\.(js|css)(\\?|$)/.test(r.name));
            const slowest = assets.reduce((a, r) => (!a || r.duration > a.duration) ? r : a, null);
            return {
                dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
                assets: assets.length,
                assets_end: Math.max(0, ...assets.map(r => r.responseEnd)),
                wire: assets.reduce((s, r) => s + r.transferSize, 0),
                unpacked: assets.reduce((s, r) => s + r.decodedBodySize, 0),
                slowest_name: slowest ? slowest.name.split('/').pop() : '',
                slowest_wait: slowest ? slowest.responseStart - slowest.requestStart : 0,
                slowest_receive: slowest ? slowest.responseEnd - slowest.responseStart : 0,
            };
        }""")
    finally:
        context.close()
    return {
        "rows shown ms": shown,
        "scripts and styles arrived ms": timing["assets_end"],
        "DOMContentLoaded ms": timing["dcl"],
        "load event ms": timing["load"],
        "main thread busy ms": (busy_after["TaskDuration"] - busy_before["TaskDuration"]) * 1000,
        "of which scripts ms": (busy_after["ScriptDuration"] - busy_before["ScriptDuration"]) * 1000,
        "scripts and styles": timing["assets"],
        "on the wire KiB": timing["wire"] / 1024,
        "unpacked KiB": timing["unpacked"] / 1024,
        "slowest script or style waiting ms": timing["slowest_wait"],
        "slowest script or style receiving ms": timing["slowest_receive"],
    }, timing["slowest_name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=3, help="first loads to measure (default 3)")
    parser.add_argument("--experiment", help="the experiment whose row ends a load (default: the first listed)")
    args = parser.parse_args(argv)
    if args.loads < 1:
        parser.error("--loads must be at least 1")
    base = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
    if not base.startswith("https://"):
        print("ui_load.py: set the stack's client settings first: eval \"$(./show_all.sh --client-env)\"",
              file=sys.stderr)
        return 2
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    name = args.experiment or first_experiment(base, auth)
    loads = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for n in range(args.loads):
                for attempt in range(1, 4):
                    try:
                        figures, slowest = one_load(browser, base, auth, name)
                        break
                    except NetworkChanged:
                        print(f"load {n + 1}: Chromium aborted requests with ERR_NETWORK_CHANGED; measuring again")
                        if attempt == 3:
                            raise
                loads.append(figures)
                print(f"load {n + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
                      + f" (the slowest: {slowest})")
        finally:
            browser.close()
    print(f"UI first load, median of {len(loads)} (machine: {os.cpu_count()} CPUs, {cpu_model()}):")
    for key in loads[0]:
        print(f"  {key:45s} {statistics.median(load[key] for load in loads):9.0f}")
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
