"""The demo's time from click to image, measured in a real (headless) browser.

    python benchmarks/demo_latency.py --student runs/quickstart/student --repeats 10
    python benchmarks/demo_latency.py --student runs/quickstart/student --teacher digits --json demo.json

Starts ``onestep demo`` as its own process on a free localhost port, opens the page in Debian's
headless Chromium (Selenium + the system chromedriver), and for each repeat: reloads the page
(empty gallery), clicks *Generate* and measures in the page, with ``performance.now()``, the time
until the first new image has loaded in the student gallery. Also reads the sampler's own time
(what the page reports, measured around the sampler call) so the two can be told apart: the
rest is Gradio's queue, PNG encoding, the event stream and the image download.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

STATUS_RE = re.compile(r"student.*?([\d.]+) ms per image \((\d+) images? in ([\d.]+) ms\)")


def measure(student: str, teacher: str | None, repeats: int, log: Path) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the demo-driving helpers are test support
    from demo_testing import click_to_image_ms, headless_chromium, start_demo, stop_demo, wait_for

    t0 = time.perf_counter()
    proc, url = start_demo(student, teacher=teacher, log=log, timeout=300)
    startup = time.perf_counter() - t0
    click_ms, sampler_ms, images = [], [], None
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = headless_chromium(profile)
            try:
                for _ in range(repeats):
                    driver.get(url)
                    wait_for(driver, "#generate")
                    click_ms.append(click_to_image_ms(driver))
                    status = WebDriverWait(driver, 60).until(
                        lambda d: STATUS_RE.search(d.find_element(By.CSS_SELECTOR, "#demo-status").text.replace("\n", " "))
                    )
                    sampler_ms.append(float(status.group(3)))
                    images = int(status.group(2))
            finally:
                driver.quit()
    finally:
        stop_demo(proc)
    return {
        "student": student,
        "teacher": teacher,
        "images_per_click": images,
        "repeats": repeats,
        "demo_startup_seconds": startup,
        "click_to_image_ms": click_ms,
        "click_to_image_ms_median": statistics.median(click_ms),
        "sampler_ms_total": sampler_ms,
        "sampler_ms_total_median": statistics.median(sampler_ms),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/quickstart/student", help="student folder (default: the quickstart's)")
    p.add_argument("--teacher", default=None, help="also run the teacher side by side (e.g. digits)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = measure(args.student, args.teacher, args.repeats, Path(d) / "demo.log")
    print(f"demo start-up (process start to page served): {out['demo_startup_seconds']:.1f} s")
    print(
        f"click to image: median {out['click_to_image_ms_median']:.0f} ms over {out['repeats']} clicks "
        f"(min {min(out['click_to_image_ms']):.0f}, max {max(out['click_to_image_ms']):.0f}), "
        f"{out['images_per_click']} images per click"
    )
    print(f"of which the sampler call: median {out['sampler_ms_total_median']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
