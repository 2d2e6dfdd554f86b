"""The leak detector and the sampler in-process (working inputs, no worker)."""

from __future__ import annotations

import threading
from pathlib import Path

from workers import memory
from workers.sampler import Sample, Sampler, SamplerState, collect

MIB = 1 << 20


def test_growing_floor_is_suspected_after_n_windows(tmp_path: Path) -> None:
    reports: list[str] = []
    det = memory.LeakDetector(warmup=3, window=4, windows=3, min_growth=MIB,
                              report=reports.append)
    readings = [100 * MIB] * 3 + [100 * MIB + i * MIB for i in range(16)]
    results = [det.observe(r) for r in readings]
    assert [i for i, r in enumerate(results) if r] == [18]
    assert det.suspected == 1 and len(reports) == 1
    assert "over 3 windows of 4 operations" in reports[0]


def test_spikes_and_flat_floors_are_not_suspected() -> None:
    det = memory.LeakDetector(warmup=0, window=5, windows=3, min_growth=MIB)
    for i in range(500):
        spike = 300 * MIB if i % 7 == 0 else 0  # big operations now and then
        assert det.observe(100 * MIB + (i % 3) * 4096 + spike) is None
    assert det.suspected == 0


def test_tracemalloc_diff_is_written_and_named(tmp_path: Path) -> None:
    import tracemalloc

    det = memory.LeakDetector(warmup=1, window=2, windows=2, min_growth=MIB,
                              trace_dir=tmp_path)
    kept = []
    try:
        text = None
        for i in range(20):
            kept.append(bytearray(2 * MIB))
            text = det.observe(100 * MIB + i * 2 * MIB) or text
        assert text is not None
        path = Path(text.rsplit("allocations=", 1)[1])
        assert path.parent == tmp_path and path.read_text().strip()
    finally:
        tracemalloc.stop()


def test_release_and_readings() -> None:
    memory.release()
    assert memory.rss() > 10 * MIB
    assert memory.peak_rss() >= memory.rss() // 2
    assert memory.uss() > 0
    assert memory.recycle_reason(0) is None
    assert "memory peak_rss=" in (memory.recycle_reason(1) or "")


def test_sampler_start_stop_twice_leaves_no_thread() -> None:
    seen: list[Sample] = []
    sampler = Sampler(0.05, lambda: collect(lambda: {"pool_size": 1}), seen.append)
    for _ in range(2):
        sampler.start()
        sampler.start()
        assert sampler.state is SamplerState.RUNNING
        while len(seen) < 2:
            threading.Event().wait(0.01)
        sampler.stop()
        sampler.stop()
        assert sampler.state is SamplerState.STOPPED
        assert not [t for t in threading.enumerate() if t.name == "repoindex-sampler"]
        seen.clear()
    sample = sampler.sample()
    assert sample.fds > 0 and sample.rss > 0 and sample.pool == {"pool_size": 1}
    assert sampler.latest is sample and sample.as_dict()["pid"] == sample.pid


def test_sampler_survives_a_failing_collect() -> None:
    calls = []

    def boom() -> Sample:
        calls.append(1)
        raise OSError("no /proc")

    sampler = Sampler(0.01, boom)
    sampler.start()
    while len(calls) < 3:
        threading.Event().wait(0.01)
    sampler.stop()
    assert sampler.latest is None
