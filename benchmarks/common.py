"""Measurement helpers shared by the benchmark scripts: timing, FLOPs, peak memory, child processes.

Every contender runs in a fresh child process (`run_child`) so that its peak resident memory
(`getrusage(RUSAGE_SELF).ru_maxrss`) is its own and not the maximum of everything measured before it; the
child prints one `RESULT {json}` line that the parent collects.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matmul: the practical compute ceiling the %-of-peak figures use.

    The best (not the median) repeat is taken because the ceiling is what the hardware can do; noise from
    other processes only ever lowers a figure.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def _cpu_flash_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                               out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                                        *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention that `fn` runs, backward included.

    torch's counter has no formula for the CPU flash-attention kernels that SDPA dispatches to here, so
    they are added (same formulas as the CUDA kernels); without them attention would count as free.
    """
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


#: A call counts as uncontended when it got at least this share of `threads` cores (CPU time / wall time).
CLEAN_CPU_SHARE = 0.8


def clean_times(times: Sequence[float], cpu_times: Sequence[float], threads: int | None = None) -> list[float]:
    """The wall times of calls that had the cores to themselves (all of them if none did).

    On a shared machine another process on one of two cores does not just halve throughput: OpenMP's
    spinning barriers make a 2-thread op wait for the descheduled thread, so such steps run 3-5x slower
    and say nothing about the code. CPU time close to threads x wall time shows a step was not disturbed.
    """
    threads = threads or torch.get_num_threads()
    clean = [w for w, c in zip(times, cpu_times) if c >= CLEAN_CPU_SHARE * threads * w]
    return clean or list(times)


def summarize(times: Sequence[float], cpu_times: Sequence[float] | None = None) -> dict[str, Any]:
    """Median (the figure reported) over uncontended calls, with min, max and how many calls counted."""
    used = clean_times(times, cpu_times) if cpu_times is not None else list(times)
    return {"median_s": statistics.median(used), "min_s": min(used), "max_s": max(used),
            "clean_calls": len(used), "calls": len(times)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch build and threads, load when measured."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
    }


def run_rounds(module: str, contenders: Sequence[str], rounds: int, common: Sequence[str],
               first_round_extra: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Every contender once per round, interleaved (so that load from elsewhere hits all alike), each in a fresh
    process; `first_round_extra` goes to the first round's runs only (e.g. a FLOP count)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        for name in contenders:
            extra = list(first_round_extra) if round_index == 0 else []
            results[name].append(run_child(module, ["--child", name, *common, *extra]))
    return results


def best_peak(peak: float, results: dict[str, list[dict[str, Any]]]) -> float:
    """The highest matmul peak measured, by the parent or by any child (a disturbed measurement is lower)."""
    return max([peak, *(run.get("matmul_peak_gflops", 0.0) for runs in results.values() for run in runs)])


def write_results(path: str | None, peak: float, args: Any, rows: list[dict[str, Any]], table: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"peak_gflops": peak, "machine": machine(), "args": vars(args),
                                          "rows": rows, "table": table}, indent=1))


def start_parent(threads: int) -> float:
    """Set the thread count and measure the matmul peak the figures are compared with."""
    if threads:
        torch.set_num_threads(threads)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)
    return peak


def finish_child(result: dict[str, Any]) -> None:
    """Add the child's peak memory and a fresh matmul peak (the parent's may have been disturbed), then emit."""
    result["peak_rss_mib"] = peak_rss_mib()
    result["matmul_peak_gflops"] = matmul_peak_gflops()
    emit_result(result)


def emit_result(result: dict[str, Any]) -> None:
    """Print a child's result as the one line the parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run `python -m module args...` from the repository root and return the RESULT it printed.

    The child's other output is passed through, so progress stays visible in the parent's log.
    """
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, text=True,
                          stdout=subprocess.PIPE, timeout=timeout_s, check=False)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            print(line, flush=True)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"{module} {' '.join(args)} failed with exit status {proc.returncode}")
    return result


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a Markdown table; `columns` are (key, header) pairs, floats printed with 3 significant digits."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
