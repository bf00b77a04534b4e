"""Load test of ``segany serve`` on loopback: N concurrent clients for a fixed time.

Starts the server as a subprocess on 127.0.0.1 (a free port), uploads one image, then runs
``--clients`` threads for ``--duration`` seconds. Each client loops: mostly ``/predict`` calls (one to
three clicks, half of them refining the previous mask with its logits handle), and with probability
``--upload-fraction`` the upload of a new image (a new embedding, so the byte-bounded cache fills and
evicts). Prints requests/s, latency percentiles per kind, errors, and the server's RSS before and after
(it should stay bounded by the model + ``--cache-mb``). Every request goes to 127.0.0.1 only, and the
loop stops by itself.

    python benchmarks/server_load.py [--duration 60] [--clients 20] [--model default|PATH] [--cache-mb 64]

Without ``--model`` it serves the default model when it has been trained, else the default architecture
with random weights (the same speed). The server inherits this process's environment (e.g.
``OMP_NUM_THREADS``, torch's thread count).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = REPO / "src" / "segany" / "weights" / "segany_default.safetensors"


def make_image(seed: int, h: int = 480, w: int = 640) -> bytes:
    """A JPEG of smooth colour with a few rectangles (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 90.0)], -1) + rng.normal(0, 6, (h, w, 3))
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
        img[y0 : y0 + rng.integers(30, 150), x0 : x0 + rng.integers(30, 200)] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None, ctype: str) -> tuple[int, bytes]:
        try:
            self.conn.request(method, path, body=body, headers={"Content-Type": ctype})
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnect on the next call
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            raise

    def upload(self, data: bytes) -> tuple[int, dict]:
        status, body = self.request("POST", "/api/images", data, "image/jpeg")
        return status, json.loads(body) if status == 200 else {}

    def predict(self, image_id: str, payload: dict) -> tuple[int, dict]:
        status, body = self.request(
            "POST", f"/api/images/{image_id}/predict", json.dumps(payload).encode(), "application/json"
        )
        return status, json.loads(body) if status == 200 else {}


def start_server(
    model: str, port: int, cache_mb: float, extra: Sequence[str] = (), log: IO[str] | None = None
) -> subprocess.Popen:
    """``segany serve`` on 127.0.0.1:``port`` with ``extra`` flags; returns once it accepts connections.

    ``log``: a file for the server's stderr (else a pipe, read only if the server fails to start; a
    long run that logs much should pass a file, as an unread pipe that fills up blocks the server)."""
    cmd = [
        sys.executable,
        "-c",
        "from segany.cli import main; raise SystemExit(main())",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--cache-mb",
        str(cache_mb),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if log is None else log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else 'see its log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), then SIGKILL if it is still there after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--model", help="model name or checkpoint (default: see the module docstring)")
    ap.add_argument("--cache-mb", type=float, default=64.0)
    ap.add_argument("--upload-fraction", type=float, default=0.02, help="share of requests that upload a new image")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        if DEFAULT_WEIGHTS.is_file():
            model = "default"
        else:
            import torch

            from segany.checkpoint import save_model
            from segany.modeling import build_sam, get_config

            torch.manual_seed(0)
            model = str(Path(tmp.name) / "segany_default_random.safetensors")
            save_model(build_sam(get_config("segany_default")), model)
            print("model: segany_default architecture, random weights (the trained default is not there yet)")
    port = free_port()
    proc = start_server(model, port, args.cache_mb)
    try:
        return run_load(proc, port, args)
    finally:
        stop_server(proc)
        tmp.cleanup()


def run_load(proc: subprocess.Popen, port: int, args: argparse.Namespace) -> int:
    images = [make_image(seed) for seed in range(200)]
    status, first = Client(port).upload(images[0])
    if status != 200:
        raise SystemExit(f"the first upload failed: HTTP {status}")
    image_id, w, h = first["image_id"], first["width"], first["height"]
    rss_before = rss_mb(proc.pid)
    print(
        f"server pid {proc.pid} on 127.0.0.1:{port}, RSS after the first upload {rss_before:.0f} MB; "
        f"{args.clients} clients for {args.duration:.0f} s, cache {args.cache_mb:.0f} MB"
    )

    lat: dict[str, list[float]] = {"predict": [], "upload": []}
    errors: list[str] = []
    lock = threading.Lock()
    next_image = [1]
    stop_at = time.monotonic() + args.duration

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        client = Client(port)
        handle = None
        while time.monotonic() < stop_at:
            if rng.random() < args.upload_fraction:
                with lock:
                    data = images[next_image[0] % len(images)]
                    next_image[0] += 1
                kind, t0 = "upload", time.perf_counter()
                try:
                    status, _ = client.upload(data)
                except Exception as e:  # noqa: BLE001 - counted, the load goes on
                    status = f"{type(e).__name__}"
            else:
                n = rng.randint(1, 3)
                payload = {
                    "points": [[rng.uniform(0, w - 1), rng.uniform(0, h - 1)] for _ in range(n)],
                    "labels": [1] + [rng.randint(0, 1) for _ in range(n - 1)],
                    "multimask": n == 1,
                }
                if handle and rng.random() < 0.5:
                    payload["mask_input"] = handle
                kind, t0 = "predict", time.perf_counter()
                try:
                    status, out = client.predict(image_id, payload)
                    handle = out["masks"][0]["logits"] if status == 200 else None
                except Exception as e:  # noqa: BLE001
                    status = f"{type(e).__name__}"
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    lat[kind].append(dt)
                else:
                    errors.append(f"{kind}: {status}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    rss_after = rss_mb(proc.pid)

    total = sum(len(v) for v in lat.values())
    print(f"requests: {total} ok in {elapsed:.1f} s = {total / elapsed:.1f} requests/s; errors: {len(errors)}")
    for kind, xs in lat.items():
        if xs:
            p50, p95 = np.percentile(xs, [50, 95])
            print(
                f"  {kind:8s} n={len(xs):6d}  p50 {1000 * p50:7.1f} ms  p95 {1000 * p95:7.1f} ms  "
                f"max {1000 * max(xs):7.1f} ms"
            )
    if errors:
        print("  first errors: " + ", ".join(errors[:5]))
    print(
        f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after "
        f"(cache limit {args.cache_mb:.0f} MB, {next_image[0] - 1} new images uploaded)"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
