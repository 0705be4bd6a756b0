#!/usr/bin/env python
"""A bounded load test of `ldm-serve` on this machine: N requests from C concurrent clients, 127.0.0.1 only.

    python scripts/loadtest.py                      # 200 requests, 50 clients, a server with --max_queue 16
    python scripts/loadtest.py --url http://127.0.0.1:7860 --api_key KEY   # against a running server

Without --url it starts `scripts/serve.py` (digits model) on a free port with a fresh data directory and stops it
after. Three in four requests are native jobs (POST /v1/jobs, answered at once), one in four A1111 txt2img calls
(answered when the image is made); both go through the one queue. It checks what docs/serving.md promises: every
answer is 2xx or 429 with Retry-After, none is 5xx, every accepted job succeeds; and reports throughput, p50/p95
latency, the share of 429s and the server's peak memory (VmHWM). Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Connection:
    """One client's keep-alive HTTP/1.1 connection (a few lines of asyncio: a pooled client library's own overhead
    was larger than the server's on this 2-core machine, and would have been measured instead of the server)."""

    def __init__(self, url: str, headers: dict[str, str]):
        parsed = urlparse(url)
        self.host, self.port, self.headers = parsed.hostname, parsed.port or 80, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(data)}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if body is not None:
            lines.append("Content-Type: application/json")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.writer.close()
            self.writer = None
        return status, headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(args: argparse.Namespace, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[dict] = []
    accepted: list[str] = []
    counter = iter(range(args.requests))

    async def client() -> None:
        c = Connection(url, headers)
        try:
            for i in counter:
                body = {"prompt": f"a handwritten digit {i % 10}", "seed": i, "steps": args.steps}
                start = time.monotonic()
                if i % 4 == 3:
                    status, got, _ = await c.request("POST", "/sdapi/v1/txt2img", {**body, "batch_size": 1})
                    kind = "a1111"
                else:
                    status, got, payload = await c.request("POST", "/v1/jobs", body)
                    kind = "native"
                    if status == 202:
                        accepted.append(json.loads(payload)["id"])
                results.append({"kind": kind, "status": status, "seconds": time.monotonic() - start,
                                "retry_after": got.get("retry-after")})  # fmt: skip
        finally:
            c.close()

    began = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(args.clients))), args.timeout)
    answered = time.monotonic() - began
    jobs = []
    poller = Connection(url, headers)
    for job_id in accepted:  # every accepted job must end succeeded
        while True:
            _, _, payload = await poller.request("GET", f"/v1/jobs/{job_id}")
            job = json.loads(payload)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                jobs.append(job)
                break
            await asyncio.sleep(0.05)
    poller.close()
    finished = time.monotonic() - began
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ok = [r for r in results if 200 <= r["status"] < 300]
    a1111_ok = [r for r in ok if r["kind"] == "a1111"]
    job_seconds = [j["finished"] - j["created"] for j in jobs]
    problems = [f"{r['kind']} answered {r['status']}" for r in results if not (200 <= r["status"] < 300 or
                r["status"] == 429)]  # fmt: skip
    problems += ["429 without Retry-After" for r in results if r["status"] == 429 and not r["retry_after"]]
    problems += [f"job {j['id']} ended {j['status']}: {j['error']}" for j in jobs if j["status"] != "succeeded"]
    images = len(jobs) + len(a1111_ok)
    return {
        "requests": len(results), "clients": args.clients, "steps": args.steps, "statuses": statuses,
        "share_429": round(statuses.get("429", 0) / max(1, len(results)), 3),
        "seconds_to_answer_all": round(answered, 2), "seconds_until_all_jobs_done": round(finished, 2),
        "answers_per_second": round(len(results) / answered, 1), "images": images,
        "images_per_second": round(images / finished, 2),
        "latency_p50_ms": round(1000 * percentile([r["seconds"] for r in results], 0.5), 1),
        "latency_p95_ms": round(1000 * percentile([r["seconds"] for r in results], 0.95), 1),
        "accepted_native_p50_ms": round(1000 * (percentile([r["seconds"] for r in ok if r["kind"] == "native"], 0.5)
                                                or 0), 1),
        "a1111_sync_p50_s": round(percentile([r["seconds"] for r in a1111_ok], 0.5) or 0, 2),
        "a1111_sync_p95_s": round(percentile([r["seconds"] for r in a1111_ok], 0.95) or 0, 2),
        "job_queue_to_done_p50_s": round(percentile(job_seconds, 0.5) or 0, 2),
        "job_queue_to_done_p95_s": round(percentile(job_seconds, 0.95) or 0, 2),
        "problems": problems,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server on 127.0.0.1 (default: start one)")
    p.add_argument("--api_key", default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--max_queue", type=int, default=16, help="for the server this script starts")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per job")
    p.add_argument("--threads", type=int, default=None, help="--threads of the server this script starts")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 1000 and 1 <= args.clients <= 100):
        p.error("at most 1000 requests and 100 clients: this is a bounded test")
    server = None
    if args.url is not None:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url must be on this machine (127.0.0.1)")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        data_dir = tempfile.mkdtemp(prefix="ldm-loadtest-")
        argv_ = [sys.executable, str(REPO / "scripts" / "serve.py"), "--port", str(port), "--data_dir", data_dir,
                 "--max_queue", str(args.max_queue)] + (["--threads", str(args.threads)] if args.threads else [])
        server = subprocess.Popen(argv_, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > end:
                print("error: the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
    try:
        summary = asyncio.run(run(args, url))
        if server is not None:
            summary["server_peak_rss_mib"] = peak_rss_mib(server.pid)
            summary["max_queue"] = args.max_queue
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                summary_exit = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                summary_exit = None
    if server is not None:
        summary["server_exit_code"] = summary_exit
        if summary_exit != 0:
            summary["problems"].append(f"the server exited {summary_exit} after SIGTERM")
    print(json.dumps(summary, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main())
