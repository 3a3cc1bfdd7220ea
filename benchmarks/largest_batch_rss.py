"""Server RSS before and after the largest batch: what one model run of the biggest shape adds.

    .venv/bin/python benchmarks/largest_batch_rss.py [--artifact DIR]

Starts `stableembed serve` on all-MiniLM-L6-v2 (the artifact soak.py uses, exported if missing), reads
its RSS (/proc VmRSS) after start-up, after three small requests, after one request of 8 / 16 / 64 texts
of 256 tokens (8 × 256 = 2,048 padded tokens is one model run at the Encoder's default budget), and after
three more of 64. Explains the one step in the soak's RSS curve (README, Serving). Prints the CPU line.
"""

from __future__ import annotations

import argparse

import httpx

from machine import announce, machine
from serve_load import start_server
from soak import HERE, artifact_path, rss_kib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=None)
    args = ap.parse_args()
    from stableembed.serve.server import free_port

    announce(machine())
    artifact = artifact_path(args.artifact)
    port = free_port()
    proc = start_server(artifact, port, None, [], model_name="m")
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    paragraphs = [l for l in (HERE / "data" / "long.txt").read_text(encoding="utf-8").split("\n") if len(l) > 1000]
    full = (paragraphs * 64)[:64]  # each over 256 tokens: truncated to max_length

    def post(texts: list[str]) -> None:
        r = httpx.post(url, json={"model": "m", "input": texts}, timeout=600)
        r.raise_for_status()

    def show(what: str) -> None:
        print(f"{what:48s} RSS {rss_kib(proc.pid)[0] / 1024:7.1f} MiB", flush=True)

    try:
        show("after start-up")
        for i in range(3):
            post([f"a short text, number {i}"] * 8)
        show("after three requests of 8 short texts")
        for n in (8, 16, 64):
            post(full[:n])
            show(f"after one request of {n} texts of 256 tokens")
        for _ in range(3):
            post(full)
        show("after three more requests of 64 such texts")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
