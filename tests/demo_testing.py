"""Test support: helpers to drive a running demo from outside. ``tests/test_demo.py`` imports them, and
``benchmarks/demo_latency.py`` and ``benchmarks/demo_load.py`` too (they put this folder on ``sys.path``); they are
not installed.

- :func:`start_demo` runs ``onestep demo`` as its own process on a free localhost port and waits
  until the page answers; :func:`stop_demo` ends that process by its PID.
- :func:`headless_chromium` starts the system Chromium through Selenium and the system
  ``chromedriver`` (nothing is downloaded); :func:`click_to_image_ms` clicks *Generate* and
  measures, inside the page, the time until a new image shows in the student gallery.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from onestep.errors import OnestepError

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
# Without the networking switches Chromium stalls on a machine with no internet.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(
    student: str | Path,
    teacher: str | Path | None = None,
    port: int | None = None,
    log: str | Path | None = None,
    timeout: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """Start ``onestep demo`` in a new process on ``127.0.0.1:port`` and wait until it serves the page.

    Returns ``(process, url)``. Its output goes to ``log`` (or is discarded). If the process exits
    or does not answer within ``timeout`` seconds, it is stopped and an error names the log.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "onestep.cli", "demo", "--student", str(student), "--port", str(port)]
    if teacher is not None:
        cmd += ["--teacher", str(teacher)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise OnestepError(f"the demo exited with code {proc.returncode} before serving (log: {log})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    stop_demo(proc)
    raise OnestepError(f"the demo did not answer on {url} within {timeout:.0f} s (log: {log})")


def stop_demo(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop the demo process by its own PID (SIGTERM, then SIGKILL); return its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


def find_chromium() -> tuple[str, str] | None:
    """Paths of the system Chromium and its ``chromedriver``, or None when either is missing."""
    browser = next((p for p in CHROMIUM_CANDIDATES if Path(p).exists()), None) or shutil.which("chromium")
    driver = next((p for p in CHROMEDRIVER_CANDIDATES if Path(p).exists()), None) or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(user_data_dir: str | Path):
    """A Selenium driver for the system's headless Chromium with a fresh profile in ``user_data_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise OnestepError("Chromium or chromedriver is missing: apt-get install chromium chromium-driver")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(driver, css: str, timeout: float = 30.0):
    """The first element matching ``css`` once it is displayed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


# Runs in the page: remember which images the student gallery shows, click Generate, and resolve
# with the milliseconds until an image that was not there before has loaded (or -1 on timeout).
_CLICK_TO_IMAGE_JS = """
const done = arguments[arguments.length - 1];
const timeoutMs = arguments[0];
const gallery = document.querySelector('#student-gallery');
const loaded = () => Array.from(gallery.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0);
const before = new Set(loaded().map(i => i.currentSrc || i.src));
const t0 = performance.now();
document.querySelector('#generate').click();
(function poll() {
  const fresh = loaded().filter(i => !before.has(i.currentSrc || i.src));
  if (fresh.length > 0) { done(performance.now() - t0); return; }
  if (performance.now() - t0 > timeoutMs) { done(-1); return; }
  requestAnimationFrame(poll);
})();
"""


def click_to_image_ms(driver, timeout: float = 60.0) -> float:
    """Click *Generate* and return the milliseconds until a new image is shown in the student gallery.

    Measured in the page with ``performance.now()`` from the click to the first new ``<img>`` that
    has loaded. The gallery must not already show the images this click produces (start from an
    empty gallery or change the seed first), or no new image appears.
    """
    driver.set_script_timeout(timeout + 5)
    ms = driver.execute_async_script(_CLICK_TO_IMAGE_JS, timeout * 1e3)
    if ms is None or ms < 0:
        raise OnestepError(f"no new image appeared in the student gallery within {timeout:.0f} s of the click")
    return float(ms)
