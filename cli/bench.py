"""``repoindex bench ...``: the benchmark commands; the drivers are the ``bench`` package."""

from __future__ import annotations

import click

from cli.common import long_running


@click.group()
def bench() -> None:
    """Benchmarks: tables of medians and ratios (not CI tests)."""
    long_running()


@bench.command("index")
@click.option("--files", default=10_000, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_index_cmd(files: int, runs: int, json_out: str | None) -> None:
    """Full index vs the floor, no-change re-index, peak RSS growth (real worker)."""
    from bench.common import table, write_json
    from bench.index import bench_index

    doc = bench_index(files, runs, click.echo)
    med = doc["median"]
    click.echo(table([
        ("files", str(files)), ("runs (medians)", str(runs)),
        ("full index, ours", f"{med['ours']:.2f} s ({doc['files_per_s']:.0f} files/s)"),
        ("full index, floor", f"{med['floor']:.2f} s ({doc['floor_files_per_s']:.0f} files/s)"),
        ("ratio ours/floor", f"{doc['ratio_to_floor']:.2f}"),
        ("no-change re-index", f"{med['nochange']:.3f} s"),
        ("peak RSS growth of the child (max)",
         f"{max(doc['samples']['rss_growth']) / 2**20:.1f} MiB"),
        ("peak RSS of a git process (max)",
         f"{max(doc['samples']['git_peak_rss']) / 2**20:.1f} MiB"),
    ]))
    write_json(json_out, doc)


@bench.command("reindex")
@click.option("--sizes", default="10000,100000,200000", show_default=True,
              help="Repository sizes (files), side by side in one run.")
@click.option("--runs", default=5, show_default=True, help="Re-indexes of each kind (medians).")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_reindex_cmd(sizes: str, runs: int, json_out: str | None) -> None:
    """Full index vs floor, no-change, 3-file and 1 % re-index at each size (real worker)."""
    from bench.common import write_json
    from bench.reindex import bench_reindex

    doc = bench_reindex([int(n) for n in sizes.split(",")], runs, click.echo)
    click.echo("| files | full index / floor (ratio) | no-change | 3-file change |"
               " 1 % change | each further changed file |")
    click.echo("|---|---|---|---|---|---|")
    for files, row in doc["results"].items():
        one = row["1 %"]
        click.echo(f"| {files} | {row['full']:.2f} s / {row['floor']:.2f} s"
                   f" ({row['ratio']:.2f}) | {row['nochange']['median'] * 1000:.1f} ms |"
                   f" {row['3 files']['median'] * 1000:.1f} ms |"
                   f" {one['median'] * 1000:.0f} ms ({one['changed']} files) |"
                   f" {row['per_changed_file_s'] * 1000:.3f} ms |")
    s = doc["slope"]
    click.echo(f"change time = {s['fixed_s'] * 1000:.1f} ms + {s['per_changed_file_s'] * 1000:.3f}"
               f" ms per changed file (least squares over every size); a 3-file change grows"
               f" {s['three_files_per_100k_repo_files_s'] * 1000:.1f} ms per 100,000 files"
               " of repository")
    write_json(json_out, doc)


@bench.command("search")
@click.option("--source", default=".", show_default=True, help="A git repository to search.")
@click.option("--copies", default=10, show_default=True, help="Corpus size of the growth run.")
@click.option("--grow-with", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Grow the corpus with these trees (repositories or directories of other"
                   " code) instead of copies; repeatable.")
@click.option("--runs", default=9, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_search_cmd(source: str, copies: int, grow_with: tuple[str, ...], runs: int,
                     json_out: str | None) -> None:
    """Search vs git grep and rg, in-process and CLI, and as the corpus grows."""
    from pathlib import Path

    from bench.common import table, write_json
    from bench.search import bench_search

    doc = bench_search(Path(source).resolve(), copies, runs, click.echo,
                       [Path(t).resolve() for t in grow_with])
    grown = (f"{doc['growth_factor']:.1f}x ({'other code' if grow_with else 'copies'},"
             " by lines)")
    click.echo("| kind | pattern | matches | ours ms | CLI ms | git grep ms | rg ms |"
               f" ours {grown} ms |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for r in doc["patterns"]:
        rg = f"{r['rg'] * 1000:.1f}" if "rg" in r else "-"
        click.echo(f"| {r['kind']} | `{r['pattern']}` | {r['matches']} | {r['ours'] * 1000:.1f} |"
                   f" {r['cli'] * 1000:.0f} | {r['git grep'] * 1000:.1f} | {rg} |"
                   f" {r['ours_grown'] * 1000:.1f} |")
    s = doc["summary"]
    click.echo(table([
        ("in-process / git grep, rare literals (median)", f"{s['ours_over_git_rare']:.2f}"),
        ("in-process / git grep, all patterns (median)", f"{s['ours_over_git_all']:.2f}"),
        ("CLI / git grep, all patterns (median)", f"{s['cli_over_git_all']:.2f}"),
        ("in-process / rg, literals (median)", "- (rg is not installed)"
         if s["ours_over_rg_literals"] != s["ours_over_rg_literals"]  # NaN: no rg runs
         else f"{s['ours_over_rg_literals']:.2f}"),
        (f"growth 1x -> {grown}, rare literals (median)", f"{s['growth_rare']:.2f}"),
        (f"growth 1x -> {grown}, all patterns (median)", f"{s['growth_all']:.2f}"),
        ("trigram index / lines (with indexes) / blobs (with TOAST)",
         f"{doc['index_bytes'] / 2**20:.1f} MiB / {doc['lines_bytes'] / 2**20:.1f} MiB"
         f" / {doc['blobs_bytes'] / 2**20:.1f} MiB"),
    ]))
    write_json(json_out, doc)


@bench.command("lifecycle")
@click.option("--files", default=2000, show_default=True)
@click.option("--runs", default=15, show_default=True)
@click.option("--steps", is_flag=True, help="Also time each step's before and after.")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_lifecycle_cmd(files: int, runs: int, steps: bool, json_out: str | None) -> None:
    """The same operation with the lifecycle machinery on and off."""
    from bench.common import table, write_json
    from bench.lifecycle import bench_lifecycle

    doc = bench_lifecycle(files, runs, click.echo, steps)
    med = doc["median"]
    click.echo(table([
        ("operation", f"no-change re-index of {files} files"), ("runs (medians)", str(runs)),
        ("lifecycle on", f"{med['on'] * 1000:.1f} ms"),
        ("lifecycle off", f"{med['off'] * 1000:.1f} ms"),
        ("median of paired differences", f"{doc['paired_diff'] * 1000:.2f} ms"),
        ("overhead", f"{doc['overhead_ratio'] * 100:.1f} %"),
        *((f"step {name} (median)", f"{sec * 1000:.3f} ms") for name, sec in doc["steps"].items()),
    ]))
    write_json(json_out, doc)


@bench.command("startup")
@click.option("--runs", default=15, show_default=True)
@click.option("--against", metavar="EXE",
              help="Another installation's repoindex script (an earlier version), timed alike.")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_startup_cmd(runs: int, against: str | None, json_out: str | None) -> None:
    """Each console command, start to exit, against one worker replica."""
    from bench.common import write_json
    from bench.startup import bench_startup

    doc = bench_startup(runs, click.echo, against)
    peer = doc.get("against_commands") or {}
    click.echo("| command | wall ms (median) | CPU ms (median) | target ms |"
               + (" --against wall ms | CPU ms |" if peer else ""))
    click.echo("|---|---|---|---|" + ("---|---|" if peer else ""))
    for name, row in doc["commands"].items():
        target = row["target_ms"] or "-"
        other = (f" {peer[name]['wall_ms']:.0f} | {peer[name]['cpu_ms']:.0f} |"
                 if peer else "")
        click.echo(f"| `{name}` | {row['wall_ms']:.0f} | {row['cpu_ms']:.0f} | {target} |"
                   + other)
    click.echo(f"load average at the end: {doc['load_average'][0]:.2f}")
    write_json(json_out, doc)


@bench.command("shutdown")
@click.option("--runs", default=5, show_default=True)
@click.option("--op-seconds", default=40.0, show_default=True,
              help="Length of the operations in flight.")
@click.option("--grace", default=30.0, show_default=True,
              help="Seconds before SIGKILL, as Docker's stop timeout.")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_shutdown_cmd(runs: int, op_seconds: float, grace: float, json_out: str | None) -> None:
    """SIGTERM to our worker and to stock Celery signal handling, same operations."""
    from bench.common import write_json
    from bench.shutdown import bench_shutdown

    doc = bench_shutdown(runs, op_seconds, grace, click.echo)
    click.echo("| worker | median exit | max exit | SIGKILLed | jobs neither done nor requeued "
               "| temp files left | rows half-written |")
    click.echo("|---|---|---|---|---|---|---|")
    for mode, s in doc["summary"].items():
        click.echo(f"| {mode} | {s['median_s']:.2f} s | {s['max_s']:.2f} s | {s['sigkilled']}"
                   f"/{runs} | {s['jobs_not_accounted']} | {s['temp_left']}"
                   f" | {s['half_written']} |")
    write_json(json_out, doc)


@bench.command("concurrent")
@click.option("--ops", default=100, show_default=True, help="Operations in flight at once.")
@click.option("--replicas", default=4, show_default=True)
@click.option("--latency-ms", default=0, show_default=True,
              help="Added to every request to Redis and PostgreSQL (root: the fleet runs in"
                   " a network namespace, through delaying relays).")
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_concurrent_cmd(ops: int, replicas: int, latency_ms: int,
                         json_out: str | None) -> None:
    """Operations in flight at once across a fleet, optionally over a slow network."""
    from bench.common import table, write_json
    from bench.replicas import bench_concurrent

    doc = bench_concurrent(ops, replicas, click.echo, latency=latency_ms / 1000)
    waits = doc["pool_wait"]
    click.echo(table([
        ("fleet", f"{replicas} replicas x {doc['children_per_replica']} children, pools of 1"),
        ("latency added per request", f"{latency_ms} ms"),
        ("succeeded", f"{doc['succeeded']} of {doc['operations']}"),
        ("waiting together / in flight at once",
         f"{doc['waiting_together']} / {doc['in_flight_at_once']}"),
        ("pool timeouts", str(doc["pool_timeouts"])),
        ("pool wait p50 / p99", f"<= {waits['p50_s']} s / <= {waits['p99_s']} s"),
        ("peak server sessions / budget",
         f"{doc['peak_server_connections']} / {doc['connection_budget']}"),
        ("until all waited together / wall", f"{doc['gate_s']:.1f} s / {doc['wall_s']:.1f} s"),
    ]))
    if doc["errors"]:
        click.echo("errors: " + "; ".join(doc["errors"][:5]), err=True)
    write_json(json_out, doc)


@bench.command("failover")
@click.option("--runs", default=5, show_default=True)
@click.option("--lease", default=20.0, show_default=True,
              help="REPOINDEX_REPLICA_LEASE of our replicas.")
@click.option("--stock-visibility", default=60, show_default=True,
              help="The visibility timeout of the stock run (Celery's default is 3600 s).")
@click.option("--op-seconds", default=5.0, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_failover_cmd(runs: int, lease: float, stock_visibility: int, op_seconds: float,
                       json_out: str | None) -> None:
    """SIGKILL of a replica to its job running on another: ours vs stock Celery settings."""
    from bench.common import write_json
    from bench.failover import bench_failover

    doc = bench_failover(runs, lease, stock_visibility, op_seconds, click.echo)
    click.echo("| settings | SIGKILL to running elsewhere, median | max | not run again |")
    click.echo("|---|---|---|---|")
    labels = {"ours": f"ours (lease {lease:g} s)",
              "stock": f"stock (visibility timeout {stock_visibility} s)"}
    for mode, row in doc["summary"].items():
        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} s"
        click.echo(f"| {labels[mode]} | {sec(row['median_s'])} | {sec(row['max_s'])} |"
                   f" {row['not_rerun']} |")
    write_json(json_out, doc)


@bench.command("all")
@click.option("--json-out", default="bench-all.json", show_default=True,
              help="Where the figures go (JSON).")
@click.option("--quick", is_flag=True, help="Small sizes: checks the command, not the figures.")
def bench_all_cmd(json_out: str, quick: bool) -> None:
    """Every benchmark in one run: one Markdown table, one JSON file."""
    from bench.all import all_rows, bench_all
    from bench.common import table, write_json

    doc = bench_all(lambda line: click.echo(line, err=True), quick=quick)
    click.echo(table(all_rows(doc)))
    write_json(json_out, doc)


@bench.command("replicas")
@click.option("--counts", default="1,2,4", show_default=True, help="Replica counts to compare.")
@click.option("--jobs", default=40, show_default=True, help="Index jobs per measurement.")
@click.option("--files", default=500, show_default=True, help="Files per repository.")
@click.option("--runs", default=3, show_default=True)
@click.option("--json-out", help="Also write the figures to this JSON file.")
def bench_replicas_cmd(counts: str, jobs: int, files: int, runs: int,
                       json_out: str | None) -> None:
    """Throughput of 1, 2, 4 ... worker replicas (one child each) on one multi-job load."""
    from bench.common import write_json
    from bench.replicas import bench_replicas

    doc = bench_replicas([int(c) for c in counts.split(",")], jobs, files, runs, click.echo)
    click.echo("| replicas | index operations/s (median) | speed-up |")
    click.echo("|---|---|---|")
    for n, rate in doc["ops_per_s"].items():
        click.echo(f"| {n} | {rate:.2f} | {doc['speedup'][n]:.2f}x |")
    write_json(json_out, doc)


@bench.command("soak")
@click.option("--ops", default=5000, show_default=True, help="Number of operations.")
@click.option("--duration", help="Run for a time instead, e.g. 24h, 90m, 600s.")
@click.option("--compress", type=click.FloatRange(min=1), default=1.0, show_default=True,
              help="Divide every time-driven period by K: --duration 15m --compress 96 is a day.")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0,
              help="At most this many operations per second (0: as fast as they go).")
@click.option("--batch", default=20, show_default=True)
@click.option("--png", default="soak.png", show_default=True, help="Where the plot goes.")
@click.option("--json-out", default="soak.json", show_default=True,
              help="The figures, rewritten as the run goes (a stopped run keeps them).")
def bench_soak_cmd(ops: int, duration: str | None, compress: float, rate: float, batch: int,
                   png: str, json_out: str) -> None:
    """Mixed operations through a real worker; per-child RSS, USS, fds, server sessions and
    every time-driven event (pool lifetimes, idle closes, Redis reconnects, samples, result
    expiry, recycles), against time."""
    from pathlib import Path

    from bench.common import table
    from bench.soak import EVENTS, check_plotting, soak

    seconds = None
    if duration:
        units = {"s": 1, "m": 60, "h": 3600}
        if duration[-1] not in units or not duration[:-1].isdigit():
            raise click.BadParameter("use a number and s, m or h, e.g. 24h", param_hint="duration")
        seconds = float(duration[:-1]) * units[duration[-1]]
    try:
        check_plotting()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    doc = soak(ops, seconds, batch, Path(png), click.echo, compress=compress, rate=rate,
               json_out=Path(json_out))
    rows = [("operations", str(doc["operations"])),
            ("duration", f"{doc['seconds']:.0f} s (a simulated {doc['simulated_hours']} h)"),
            ("failed jobs (1 in 10 fails on purpose)", str(doc["failed"])),
            ("leak warnings", str(doc["leak_warnings"])),
            ("suspected memory leaks", str(doc["suspected_memory_leaks"])),
            ("max PostgreSQL sessions", str(doc["max_server_connections"]))]
    rows += [(f"event: {name} ({EVENTS[name][0]})", str(n)) for name, n in doc["events"].items()]
    for pid, child in doc["children"].items():
        if not child.get("warmed_up", True):
            rows.append((f"child {pid}", f"replaced after {child['readings']} readings, before"
                         " its warm-up was over: no figures"))
            continue
        rows += [(f"child {pid}: fd growth after warm-up (sockets apart)",
                  str(child["fd_growth_after_warmup"])),
                 (f"child {pid}: sockets open, max - min", str(child["socket_range"])),
                 (f"child {pid}: RSS slope", f"{child['rss_slope_bytes_per_op']:.1f} B/op, "
                  f"{child['rss_slope_bytes_per_hour'] / 1024:.1f} KiB/h"),
                 (f"child {pid}: max RSS", f"{child['max_rss_mib']:.1f} MiB")]
    rows += [("plot", doc["png"]), ("json", json_out)]
    click.echo(table(rows))
