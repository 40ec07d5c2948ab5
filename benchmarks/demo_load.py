"""The demo under load: many concurrent API clients, the server's memory over the run, then bad calls.

    python benchmarks/demo_load.py --student runs/quickstart/student
    python benchmarks/demo_load.py --student runs/quickstart/student --clients 16 --requests 50 --timeout 600 --json load.json

Starts ``onestep demo`` as its own process on a free 127.0.0.1 port (``tests/demo_testing.py``'s
``start_demo``/``stop_demo``), then runs ``--clients`` threads, each with its own
``gradio_client.Client``, sending ``--requests`` valid ``/generate`` calls one after the other
(class cycling through all/0-9, a different seed each call). Every answer is checked: the student
gallery holds the asked number of images and the latency JSON says the same. Reports the
requests sent, failed and not sent (the deadline), latency per request as the client sees it
(p50/p99, submit to result), throughput, the sampler's own time (what the page reports), and the
resident memory of the demo's process tree (the process and its children, sampled every
``--sample_every`` seconds): at start, after warm-up (the first ``--warmup_fraction`` of the
requests), max, and at the end of the load; "flat" means the end lies within ``--flat_tolerance``
of the after-warm-up value.

Then malformed calls (strings for numbers, a huge image count, a negative seed, a class that is
not offered, a missing argument): each must come back to the client as a Gradio error with a
message, the server must stay up, and a valid request afterwards must still be served.

The whole run (start-up included) is bounded by ``--timeout`` seconds: requests not sent by then
are counted as not sent, and the run still reports and stops the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLASSES = ["all"] + [str(c) for c in range(10)]


# Memory of the demo's process tree -------------------------------------------------------------


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (psutil, else ``/proc/*/status``)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _proc_tree_rss(pid: int) -> int:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    total = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the tree's RSS every ``every`` seconds, with the number of requests completed by then."""

    def __init__(self, pid: int, every: float, completed):
        super().__init__(daemon=True)
        self.pid, self.every, self.completed = pid, every, completed
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, requests done, bytes)
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> int:
        rss = tree_rss_bytes(self.pid)
        self.samples.append((time.perf_counter() - self.t0, self.completed(), rss))
        return rss

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


# The load --------------------------------------------------------------------------------------


class Counter:
    def __init__(self):
        self.n = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.n += 1


def one_client(url: str, index: int, requests: int, images: int, steps: int, deadline: float, done: Counter) -> list[dict]:
    """One client's requests, one after the other; a record per request (sent or not)."""
    from gradio_client import Client

    records = []
    try:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    except Exception as e:  # noqa: BLE001 - a client that cannot connect fails all its requests
        return [{"client": index, "ok": False, "sent": True, "error": f"connect: {type(e).__name__}: {e}"}] * requests
    for i in range(requests):
        left = deadline - time.monotonic()
        if left <= 0:
            records.append({"client": index, "ok": False, "sent": False, "error": "deadline"})
            continue
        label, seed = CLASSES[(index + i) % len(CLASSES)], index * 10_000 + i
        t0 = time.perf_counter()
        try:
            job = client.submit(label, "", "", 0.0, seed, steps, images, 1, api_name="/generate")
            _, gallery, _, latency = job.result(timeout=left)
            ms = (time.perf_counter() - t0) * 1e3
            if len(gallery) != images or latency["num_images"] != images or len(latency["student"]["timesteps"]) != steps:
                raise ValueError(f"asked {images} images, {steps} steps; got {len(gallery)} images and {latency}")
            records.append({"client": index, "ok": True, "sent": True, "ms": ms, "sampler_ms": latency["student"]["ms_total"]})
        except Exception as e:  # noqa: BLE001 - every failure is counted, whatever it is
            ms = (time.perf_counter() - t0) * 1e3
            records.append({"client": index, "ok": False, "sent": True, "ms": ms, "error": f"{type(e).__name__}: {e}"[:300]})
        done.add()
    return records


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# Malformed calls -------------------------------------------------------------------------------


def _raw_call(url: str, data: list) -> tuple[str, str]:
    """POST ``data`` to ``/gradio_api/call/generate`` as a raw HTTP client; return (event, payload)."""
    req = urllib.request.Request(
        url + "gradio_api/call/generate", data=json.dumps({"data": data}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(url + f"gradio_api/call/generate/{event_id}", timeout=60) as r:
        text = r.read().decode()
    event = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("event:")), "")
    payload = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("data:")), "")
    if event == "error":
        try:
            payload = json.loads(payload).get("error") or payload
        except (ValueError, AttributeError):
            pass
    return event, payload


# (name, arguments of /generate, text the error must hold)
MALFORMED = [
    ("seed as a string", ("3", "", "", 0.0, "abc", 1, 4, 1), "index 4 (a `number` component)"),
    ("steps as a string", ("3", "", "", 0.0, 0, "two", 4, 1), "index 5 (a `slider` component)"),
    ("image count as a string", ("3", "", "", 0.0, 0, 1, "many", 1), "index 6 (a `slider` component)"),
    ("huge image count (10**9)", ("3", "", "", 0.0, 0, 1, 10**9, 1), "greater than maximum value 16"),
    ("negative seed", ("3", "", "", 0.0, -5, 1, 4, 1), "seed must be a whole number"),
    ("seed past 2**32 - 1", ("3", "", "", 0.0, 2**40, 1, 4, 1), "seed must be a whole number"),
    ("class not offered", ("10", "", "", 0.0, 0, 1, 4, 1), "not in the list of choices"),
    ("no seed (None)", ("3", "", "", 0.0, None, 1, 4, 1), "seed must be a whole number"),
]


def malformed_calls(url: str, proc) -> list[dict]:
    """Each bad call must come back as a Gradio error with ``expect`` in its message; the server must stay up."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    out = []
    for name, args, expect in MALFORMED:
        rec = {"call": name, "args": repr(args), "expect": expect}
        try:
            client.predict(*args, api_name="/generate")
            rec.update(ok=False, got="no error: the call was served")
        except AppError as e:
            rec.update(ok=expect in str(e), got=f"AppError: {e}"[:300])
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, got=f"{type(e).__name__}: {e}"[:300])
        rec["server_alive"] = proc.poll() is None
        out.append(rec)
    # A missing argument: the client refuses it itself (the prompt has no default) ...
    rec = {"call": "missing argument (gradio_client)", "args": "label='3', no prompt", "expect": "required argument: prompt"}
    try:
        client.predict(label="3", negative="", api_name="/generate")
        rec.update(ok=False, got="no error: the call was served")
    except TypeError as e:
        rec.update(ok="required argument: prompt" in str(e), got=f"TypeError (client side, never sent): {e}"[:300])
    rec["server_alive"] = proc.poll() is None
    out.append(rec)
    # ... so send one without it as raw HTTP: 7 values for 8 inputs.
    rec = {"call": "missing argument (raw HTTP, 7 of 8 values)", "args": "['3', '', '', 0.0, 0, 1, 4]", "expect": "didn't receive enough input values"}
    try:
        event, payload = _raw_call(url, ["3", "", "", 0.0, 0, 1, 4])
        rec.update(ok=event == "error" and rec["expect"] in payload, got=f"event {event}: {payload}"[:300])
    except (OSError, ValueError) as e:
        rec.update(ok=False, got=f"{type(e).__name__}: {e}"[:300])
    rec["server_alive"] = proc.poll() is None
    out.append(rec)
    return out


def valid_after(url: str) -> dict:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        _, gallery, _, latency = client.predict("7", "", "", 0.0, 123, 1, 4, 1, api_name="/generate")
        return {"ok": len(gallery) == 4 and latency["num_images"] == 4, "images": len(gallery)}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


# The run ---------------------------------------------------------------------------------------


def measure(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the demo-driving helpers are test support
    from demo_testing import start_demo, stop_demo

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    log = Path(args.log) if args.log else Path(tempfile.mkdtemp()) / "demo.log"
    t0 = time.perf_counter()
    proc, url = start_demo(args.student, log=log, timeout=min(300.0, args.timeout))
    startup = time.perf_counter() - t0
    out: dict = {
        "student": str(args.student), "clients": args.clients, "requests_per_client": args.requests,
        "images_per_request": args.images, "steps": args.steps, "timeout_s": args.timeout,
        "demo_startup_s": startup, "demo_log": str(log),
    }
    try:
        done = Counter()
        sampler = RssSampler(proc.pid, args.sample_every, lambda: done.n)
        out["rss_at_start_mb"] = sampler.sample() / 2**20
        sampler.start()
        t_load = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [
                pool.submit(one_client, url, i, args.requests, args.images, args.steps, deadline, done) for i in range(args.clients)
            ]
            records = [r for f in futures for r in f.result()]
        load_s = time.perf_counter() - t_load
        sampler.sample()
        sampler.stop()
        ok = [r for r in records if r["ok"]]
        failed = [r for r in records if r["sent"] and not r["ok"]]
        not_sent = [r for r in records if not r["sent"]]
        lat = [r["ms"] for r in ok]
        total = args.clients * args.requests
        warm_n = max(1, int(args.warmup_fraction * total))
        samples = sampler.samples
        after_warm = next((s for s in samples if s[1] >= warm_n), samples[-1])
        rss = [s[2] for s in samples]
        out.update(
            requests_total=total, requests_sent=total - len(not_sent), requests_ok=len(ok), requests_failed=len(failed),
            requests_not_sent=len(not_sent),
            errors=sorted({r["error"] for r in failed})[:10],
            load_seconds=load_s,
            throughput_rps=len(ok) / load_s if load_s > 0 else None,
            images_per_second=len(ok) * args.images / load_s if load_s > 0 else None,
            latency_ms_p50=percentile(lat, 50), latency_ms_p99=percentile(lat, 99),
            latency_ms_min=min(lat) if lat else None, latency_ms_max=max(lat) if lat else None,
            sampler_ms_median=statistics.median([r["sampler_ms"] for r in ok]) if ok else None,
            rss_after_warmup_mb=after_warm[2] / 2**20, rss_after_warmup_at_request=after_warm[1],
            rss_max_mb=max(rss) / 2**20, rss_end_mb=rss[-1] / 2**20, rss_samples=len(rss),
        )
        out["rss_end_vs_warmup"] = out["rss_end_mb"] / out["rss_after_warmup_mb"] - 1
        out["rss_flat"] = abs(out["rss_end_vs_warmup"]) <= args.flat_tolerance
        out["rss_series"] = [(round(t, 1), n, round(b / 2**20, 1)) for t, n, b in samples]
        out["server_alive_after_load"] = proc.poll() is None
        if time.monotonic() < deadline and proc.poll() is None:
            out["malformed"] = malformed_calls(url, proc)
            out["valid_after_malformed"] = valid_after(url)
            out["rss_after_malformed_mb"] = tree_rss_bytes(proc.pid) / 2**20
        else:
            out["malformed"] = None
            out["valid_after_malformed"] = {"ok": False, "error": "not run: deadline passed or the server is down"}
        out["server_alive_at_end"] = proc.poll() is None
        out["server_exit_code"] = proc.returncode
    finally:
        stop_demo(proc)
    out["wall_seconds"] = time.monotonic() - t_start
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}"
    mal = out.get("malformed") or []
    out["passed"] = bool(
        out["requests_failed"] == 0 and out["requests_not_sent"] == 0 and out["server_alive_at_end"]
        and mal and all(m["ok"] and m["server_alive"] for m in mal) and out["valid_after_malformed"]["ok"]
    )
    return out


def report(out: dict) -> str:
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    rows = [
        ("demo start-up", f"{out['demo_startup_s']:.1f} s"),
        ("clients x requests", f"{out['clients']} x {out['requests_per_client']} = {out['requests_total']} ({out['images_per_request']} images, {out['steps']} step each)"),
        ("requests ok / failed / not sent", f"{out['requests_ok']} / {out['requests_failed']} / {out['requests_not_sent']}"),
        ("load phase", f"{out['load_seconds']:.1f} s"),
        ("throughput", f"{f(out['throughput_rps'], '{:.2f}')} requests/s ({f(out['images_per_second'])} images/s)"),
        ("latency per request p50 / p99", f"{f(out['latency_ms_p50'], '{:.0f}')} / {f(out['latency_ms_p99'], '{:.0f}')} ms (min {f(out['latency_ms_min'], '{:.0f}')}, max {f(out['latency_ms_max'], '{:.0f}')})"),
        ("sampler time per request (median)", f"{f(out['sampler_ms_median'])} ms"),
        ("server RSS start / after warm-up", f"{out['rss_at_start_mb']:.0f} / {out['rss_after_warmup_mb']:.0f} MiB (after request {out['rss_after_warmup_at_request']})"),
        ("server RSS max / end", f"{out['rss_max_mb']:.0f} / {out['rss_end_mb']:.0f} MiB"),
        ("RSS end vs after warm-up", f"{100 * out['rss_end_vs_warmup']:+.1f} % ({'flat' if out['rss_flat'] else 'NOT flat'})"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    if out["errors"]:
        lines += ["errors (first kinds):"] + [f"  {e}" for e in out["errors"]]
    lines.append("malformed calls:")
    for m in out.get("malformed") or []:
        lines.append(f"  [{'ok' if m['ok'] and m['server_alive'] else 'FAIL'}] {m['call']}: {m['got'][:110]}")
    v = out["valid_after_malformed"]
    lines.append(f"valid request after them: {'ok' if v['ok'] else 'FAIL ' + v.get('error', '')}")
    lines.append(f"server alive at the end: {out['server_alive_at_end']}; whole run {out['wall_seconds']:.0f} s; passed: {out['passed']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="runs/quickstart/student", help="a digits student folder (default: the quickstart's)")
    p.add_argument("--clients", type=int, default=16, help="concurrent gradio_client clients")
    p.add_argument("--requests", type=int, default=50, help="requests per client, one after the other")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--steps", type=int, default=1, help="student steps per request")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run, start-up included")
    p.add_argument("--sample_every", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--warmup_fraction", type=float, default=0.1, help="RSS after this fraction of the requests is the reference")
    p.add_argument("--flat_tolerance", type=float, default=0.10, help="'flat': end RSS within this fraction of after warm-up")
    p.add_argument("--log", default=None, help="the demo's output goes here (default: a temporary file)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
