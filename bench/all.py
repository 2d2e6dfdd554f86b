"""``bench all``: every benchmark once, one Markdown table and one JSON file."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.index import bench_index
from bench.lifecycle import bench_lifecycle
from bench.replicas import bench_concurrent
from bench.shutdown import bench_shutdown
from bench.soak import soak


def bench_all(echo: Callable[[str], None], *, quick: bool = False) -> dict[str, Any]:
    """Every benchmark once, for one table (``quick``: small sizes, for the smoke test)."""
    files, runs = (300, 1) if quick else (10_000, 3)
    doc: dict[str, Any] = {"machine": machine()}
    echo("== index")
    doc["index"] = bench_index(files, runs, echo)
    echo("== lifecycle")
    doc["lifecycle"] = bench_lifecycle(200 if quick else 2000, 3 if quick else 41, echo)
    echo("== 1,000 operations")
    with tempfile.TemporaryDirectory(prefix="repoindex-bench-") as raw:
        doc["volume"] = soak(100 if quick else 1000, None, 20, Path(raw) / "soak.png", echo)
    echo("== operations in flight at once")
    doc["concurrent"] = bench_concurrent(8 if quick else 100, 2 if quick else 4, echo)
    echo("== shutdown")
    doc["shutdown"] = bench_shutdown(1 if quick else 3, 5.0 if quick else 40.0,
                                     3.0 if quick else 30.0, echo)
    return doc


def all_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The Markdown rows of ``bench all``."""
    idx, lc, vol, conc = doc["index"], doc["lifecycle"], doc["volume"], doc["concurrent"]
    sd = doc["shutdown"]["summary"]
    med = idx["median"]
    fd_growth = max((c["fd_growth_after_warmup"] for c in vol["children"].values()), default=0)
    waits = conc["pool_wait"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"<= {value * 1000:g} ms"

    return [
        ("machine", f"{doc['machine']['cpus']} CPUs, {doc['machine']['memory_gib']} GiB,"
                    f" Python {doc['machine']['python']}"),
        (f"full index of {idx['files']} files, ours / floor",
         f"{med['ours']:.2f} s / {med['floor']:.2f} s ({idx['files_per_s']:.0f} files/s)"),
        ("ratio ours / floor (target <= 1.5)", f"{idx['ratio_to_floor']:.2f}"),
        ("no-change re-index", f"{med['nochange']:.3f} s"),
        ("lifecycle overhead, on vs off (target < 5 %)",
         f"{lc['overhead_ratio'] * 100:.1f} % ({lc['paired_diff'] * 1000:.1f} ms of"
         f" {lc['median']['off'] * 1000:.0f} ms)"),
        (f"{vol['operations']} mixed operations: fd growth after warm-up (max of children)",
         str(fd_growth)),
        (f"{vol['operations']} mixed operations: server sessions (max) / temp areas left",
         f"{vol['max_server_connections']} / {vol['temp_left']}"),
        (f"{vol['operations']} mixed operations: leak warnings", str(vol["leak_warnings"])),
        (f"{conc['operations']} operations at once: succeeded",
         f"{conc['succeeded']} ({conc['waiting_together']} waiting together,"
         f" {conc['replicas']} replicas x {conc['children_per_replica']} children)"),
        (f"{conc['operations']} at once: peak server sessions / budget",
         f"{conc['peak_server_connections']} / {conc['connection_budget']}"),
        (f"{conc['operations']} at once: peak fds of a child / limit",
         f"{conc['peak_child_fds']} / {conc['fd_limit']}"),
        (f"{conc['operations']} at once: pool wait p50 / p99",
         f"{ms(waits['p50_s'])} / {ms(waits['p99_s'])}"),
        (f"{conc['operations']} at once: wall time", f"{conc['wall_s']:.1f} s"),
        ("shutdown with operations in flight, median / max",
         f"{sd['ours']['median_s']:.2f} s / {sd['ours']['max_s']:.2f} s (stock Celery:"
         f" {sd['stock']['median_s']:.2f} s, SIGKILLed {sd['stock']['sigkilled']}x)"),
        ("peak RSS growth of a child in a full index (max)",
         f"{max(idx['samples']['rss_growth']) / 2**20:.1f} MiB"),
        ("RSS after the operation / before (median)",
         f"{statistics.median(idx['samples']['rss_return']) * 100:.1f} %"),
    ]
