"""Data loading: items per second for each layout, and the stream's memory over a long run.

Throughput: the same generated Fill50K items at 512 px (`benchmarks/layouts.py`) in every layout, loaded as
`tutorial_train.py` loads them (`training_data`: decode, place, batch 4) with 2 worker processes, for a fixed number
of batches after a warm-up; each layout in a fresh process. A GPU step needs its batch in time: an H100 step takes
about 0.16 s at batch 4 at 512 px, so about 25 items/s must come in.

Memory: a stream of `--stream_items` items (64 px, shards of 1,000 items, cycled over epochs) read through the
2-worker loader; the resident memory of the loader (the main process plus its workers, from /proc) after 10k items
and at the end. Flat memory means a billion-item stream needs no more than a thousand-item one.

    .venv/bin/python -m benchmarks.bench_loaders --out benchmarks/results/loaders
    .venv/bin/python -m benchmarks.bench_loaders --out /tmp/loaders --n 64 --batches 10 --stream_items 20000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, run_child
from benchmarks.layouts import LAYOUTS, write_every_layout
from training.make_fill50k import make_fill50k
from training.make_webdataset import shard_pattern, write_shards
from training.sources import PromptJsonSource

BATCH, WORKERS = 4, 2


def loader_rss_mib() -> float:
    """Resident memory of this process and its children (the loader's workers), in MiB."""
    pids = [os.getpid()]
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    if children.is_file():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024.0


def _loader(data: str, *extra: str) -> Any:
    import tutorial_train

    args = tutorial_train.parse_args(["--data", data, "--batch_size", str(BATCH), "--num_workers", str(WORKERS),
                                      *extra])
    from cldm.model import create_model

    model = create_model(REPO_ROOT / "models" / "cldm_tiny.yaml")  # an SD1.x model, deferred: nothing initialised
    return tutorial_train.training_data(args, model).loader


def throughput(data: str, batches: int, warmup: int = 4) -> dict[str, float]:
    """Items per second of the layout at `data`, after `warmup` batches (worker start-up excluded)."""
    stream = iter(_loader(data))
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    return {"items_per_s": batches * BATCH / seconds, "rss_mib": loader_rss_mib()}


def stream_memory(data: str, items: int) -> dict[str, float]:
    """The loader's resident memory after 10k items and after `items` items of a long stream."""
    stream, seen, marks = iter(_loader(data)), 0, {}
    start = time.perf_counter()
    while seen < items:
        seen += len(next(stream)["txt"])
        if seen >= 10_000 and "rss_10k_mib" not in marks:
            marks["rss_10k_mib"] = loader_rss_mib()
    marks["rss_end_mib"] = loader_rss_mib()
    marks["items"] = seen
    marks["items_per_s"] = seen / (time.perf_counter() - start)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=256, help="items per layout for throughput")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--stream_items", type=int, default=100_000)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATA", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement in this fresh process
        kind, data, count = args.child
        result = throughput(data, int(count)) if kind == "throughput" else stream_memory(data, int(count))
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data_root = args.out / "data"
    layouts_file = data_root / "layouts.json"
    if not layouts_file.is_file():
        layouts = write_every_layout(data_root / f"{args.size}px", args.n, args.size, shard_size=64)
        make_fill50k(data_root / "stream", n=10_000, size=64, seed=0, workers=2)
        streamed = shard_pattern(write_shards(PromptJsonSource(data_root / "stream"), data_root / "stream_shards"))
        layouts_file.write_text(json.dumps({"layouts": layouts, "stream": streamed}))
    written = json.loads(layouts_file.read_text())
    results: dict[str, Any] = {"size": args.size, "batch": BATCH, "workers": WORKERS, "cpus": os.cpu_count()}
    module = "benchmarks.bench_loaders"
    for name in LAYOUTS:
        results[name] = run_child(module, ["--out", str(args.out), "--child", "throughput",
                                           written["layouts"][name], str(args.batches)])
        print(f"{name}: {results[name]['items_per_s']:.1f} items/s", flush=True)
    results["stream_memory"] = run_child(module, ["--out", str(args.out), "--child", "memory", written["stream"],
                                                  str(args.stream_items)])
    memory = results["stream_memory"]
    print(f"stream: {memory['items']} items, RSS {memory['rss_10k_mib']:.0f} MiB after 10k, "
          f"{memory['rss_end_mib']:.0f} MiB at the end", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
