"""Command-line options shared by every command that loads an Encoder (embed, verify, serve), so that
each means the same and defaults to the same as the Python API everywhere."""

from __future__ import annotations

import argparse
from typing import Any

from .runtime.backends import PROVIDERS
from .runtime.encoder import DEFAULT_MAX_BATCH_TOKENS, MODES


def add_provider_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu", choices=PROVIDERS,
                   help="cpu (onnxruntime), cuda or tensorrt (need the gpu or tensorrt extra); a provider "
                        "that is not installed is an error, never a fallback (default %(default)s)")


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    """--provider, --mode, --threads, --parallel-runs, --truncate/--no-truncate, --max-batch-tokens,
    --cache-size: Encoder's arguments."""
    add_provider_option(p)
    p.add_argument("--mode", default="dynamic", choices=MODES)
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each model run (default: one per physical core; with "
                        "--parallel-runs, the CPUs divided among the runs)")
    p.add_argument("--parallel-runs", type=int, default=1,
                   help="cpu: batches run at once, for throughput; same bits (default %(default)s)")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cut texts to max_length tokens (default), or refuse longer ones")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="dynamic mode: padded tokens in one model run (default %(default)s)")
    p.add_argument("--cache-size", type=int, default=0,
                   help="answer repeated (prompt, text) pairs from the last this many embeddings, exactly "
                        "(default %(default)s: no cache)")


def encoder_options(args: argparse.Namespace) -> dict[str, Any]:
    """Encoder keyword arguments from the options `add_encoder_options` added."""
    return {"provider": args.provider, "mode": args.mode, "threads": args.threads, "truncate": args.truncate,
            "max_batch_tokens": args.max_batch_tokens, "parallel_runs": args.parallel_runs,
            "cache_size": args.cache_size}
