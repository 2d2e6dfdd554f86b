"""Every path of the ResourceManager, in-process, with a real PostgreSQL pool."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from workers import resources
from workers.db import Database
from workers.errors import ResourceError
from workers.resources import ResourceManager, State, current, safe_name
from workers.settings import Settings


@pytest.fixture
def database() -> Iterator[Database]:
    db = Database(Settings.from_env())
    db.open(wait=True)
    yield db
    db.close()


def test_releases_in_reverse_order_and_counts(tmp_path: Path) -> None:
    """Entries are released newest first; the report counts what was acquired by kind."""
    order: list[str] = []
    with ResourceManager("op1", temp_root=tmp_path) as rm:
        for name in ("a", "b", "c"):
            rm.track("files", object(), lambda n=name: order.append(n), lambda: True, label=name)
    assert order == ["c", "b", "a"]
    assert rm.report is not None
    assert rm.report.acquired["files"] == 3
    assert rm.report.outcome == "succeeded"
    assert rm.state is State.CLOSED


def test_failing_step_does_not_skip_others_or_mask_error(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A cleanup failure is logged and attached; later steps still run; the op's error wins."""
    released: list[str] = []

    def boom() -> None:
        raise OSError("disk on fire")

    with pytest.raises(ValueError, match="the operation failed") as info, \
            ResourceManager("op2") as rm:
        rm.track("files", object(), lambda: released.append("first"), lambda: True)
        rm.track("temp", object(), boom, lambda: True, label="bad")
        rm.track("processes", object(), lambda: released.append("last"), lambda: True)
        raise ValueError("the operation failed")
    assert released == ["last", "first"]
    assert rm.report is not None and rm.report.outcome == "failed"
    assert rm.report.failures == [("temp", "bad", "OSError('disk on fire')")]
    assert any("cleanup of temp bad failed" in n for n in info.value.__notes__)
    assert "failures=1" in caplog.text


def test_cleanup_failure_without_operation_error_is_reported_not_raised() -> None:
    """A successful operation whose failing cleanup is logged at WARNING, not failed."""
    with ResourceManager("op3") as rm:
        rm.track("files", object(), lambda: (_ for _ in ()).throw(OSError("x")), lambda: True)
    assert rm.report is not None and len(rm.report.failures) == 1


def test_system_exit_triggers_full_cleanup(tmp_path: Path) -> None:
    """SystemExit (billiard's soft shutdown) and KeyboardInterrupt run every release step."""
    for exc_type in (SystemExit, KeyboardInterrupt):
        with pytest.raises(exc_type), ResourceManager("op4", temp_root=tmp_path) as rm:
            fh = rm.open_file(tmp_path / "f", "w")
            raise exc_type()
        assert fh.closed
        assert rm.report is not None and rm.report.outcome == "interrupted"


def test_system_exit_inside_cleanup_finishes_then_reraises(tmp_path: Path) -> None:
    """A second signal during cleanup does not leave later resources behind."""
    fh_holder: list[object] = []
    rm = ResourceManager("op5", temp_root=tmp_path).open()
    fh = rm.open_file(tmp_path / "g", "w")
    fh_holder.append(fh)
    rm.track("threads", object(), lambda: (_ for _ in ()).throw(SystemExit(1)), lambda: True)
    with pytest.raises(SystemExit):
        rm.close()
    assert fh.closed


def test_close_twice_and_acquire_after_close(tmp_path: Path) -> None:
    """Closing twice returns the same report; acquiring after close is refused clearly."""
    rm = ResourceManager("op6", temp_root=tmp_path).open()
    first = rm.close()
    assert rm.close() is first
    with pytest.raises(ResourceError, match="op6 is closed: cannot acquire files"):
        rm.open_file(tmp_path / "x", "w")
    with pytest.raises(ResourceError, match="open it once"):
        rm.open()
    with pytest.raises(ResourceError, match="unopened: cannot acquire"):
        ResourceManager("op7").track("files", object(), lambda: None, lambda: True)


def test_unknown_kind_and_missing_pool_or_temp_root() -> None:
    with ResourceManager("op8") as rm:
        with pytest.raises(ResourceError, match="unknown resource kind"):
            rm.track("sockets", object(), lambda: None, lambda: True)
        with pytest.raises(ResourceError, match="no connection pool"):
            rm.connection()
        with pytest.raises(ResourceError, match="no temp root"):
            rm.temp_area()


def test_live_counts_and_pruning_of_resources_closed_by_the_operation(tmp_path: Path) -> None:
    """Files the operation closes itself drop out: live counts stay exact, memory bounded."""
    with ResourceManager("op9", temp_root=tmp_path) as rm:
        for i in range(500):
            with rm.open_file(tmp_path / f"f{i}", "w") as fh:
                fh.write("x")
        kept = rm.open_file(tmp_path / "kept", "w")
        assert rm.live()["files"] == 1
        assert len(rm._entries) < 200
    assert kept.closed
    assert rm.report is not None and rm.report.acquired["files"] == 501


def test_connection_rolled_back_and_returned(database: Database) -> None:
    """An uncommitted transaction is rolled back and the connection goes back to the pool."""
    with pytest.raises(RuntimeError), ResourceManager("op10", pool=database.pool) as rm:
        conn = rm.connection()
        conn.execute("CREATE TEMP TABLE t_rollback (x int)")
        assert database.stats()["checked_out"] == 1
        raise RuntimeError("fail with a transaction open")
    assert database.stats()["checked_out"] == 0
    with database.connection() as again:
        assert again.info.transaction_status == 0


def test_connection_committed_and_released_early(database: Database) -> None:
    with ResourceManager("op11", pool=database.pool) as rm:
        conn = rm.connection()
        conn.execute("SELECT 1")
        conn.commit()
        rm.release(conn)
        assert rm.live()["connections"] == 0
        rm.release(conn)  # harmless twice
    assert database.stats()["checked_out"] == 0


def test_connection_refused_after_close(database: Database) -> None:
    rm = ResourceManager("op12", pool=database.pool).open()
    rm.close()
    with pytest.raises(ResourceError, match="cannot acquire connections"):
        rm.connection()


def test_process_terminated_killed_and_reaped(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is killed after the grace period; no zombie remains."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ResourceManager("op13", grace=0.3) as rm:
        stubborn = rm.popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"])
        polite = rm.popen(["sleep", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        shell = psutil.Process(stubborn.pid)
        while not shell.children():
            pass
        orphan = shell.children()[0]
    assert stubborn.returncode == -9
    assert polite.returncode == -15
    assert polite.stdout is not None and polite.stdout.closed
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    # the grandchild got SIGKILL with its process group; under load it may take a moment to die
    _, alive = psutil.wait_procs([orphan], timeout=10)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive


def test_process_that_exited_is_pruned() -> None:
    with ResourceManager("op14") as rm:
        proc = rm.popen(["true"])
        proc.wait()
        assert rm.live()["processes"] == 0


def test_thread_stopped_and_joined_or_reported() -> None:
    """Threads get their stop event; one that ignores it is a reported failure."""
    with ResourceManager("op15", grace=0.2) as rm:
        polite = rm.start_thread(lambda stop: stop.wait(30), name="polite")
        stuck_release = threading.Event()
        stuck = rm.start_thread(lambda stop: stuck_release.wait(30), name="stuck")
    assert not polite.is_alive()
    assert rm.report is not None
    assert [f[0] for f in rm.report.failures] == ["threads"]
    stuck_release.set()
    stuck.join()


def test_temp_area_and_paths_removed(tmp_path: Path) -> None:
    with ResourceManager("op/16:x", temp_root=tmp_path) as rm:
        area = rm.temp_area()
        assert area.name == f"{os.getpid()}-op_16_x"
        path = rm.temp_path("sub")
        path.mkdir()
        (path / "deep").write_text("x")
        (area / "stray").write_text("made without asking")
    assert list(tmp_path.iterdir()) == []


def test_current_scope_contextvar() -> None:
    with pytest.raises(ResourceError, match="no resource scope is open"):
        current()
    with ResourceManager("op17") as rm:
        assert current() is rm
    with pytest.raises(ResourceError):
        current()


def test_report_line_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="repoindex.cleanup")
    with ResourceManager("job-1", repo="demo"):
        pass
    expected = "cleanup op=job-1 repo=demo outcome=succeeded files=0 connections=0 temp=0"
    assert expected in caplog.text


def test_report_line_names_job_and_repo_once_in_the_text_format() -> None:
    import io

    from workers import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.TextFormatter(logs.TEXT_FORMAT))
    cleanup = logging.getLogger("repoindex.cleanup")
    cleanup.addHandler(handler)
    old_level = cleanup.level
    cleanup.setLevel(logging.INFO)
    try:
        with logs.bound(job="job-2", repo="demo"), ResourceManager("job-2", repo="demo"):
            logging.getLogger("repoindex.other").info("not this one")
    finally:
        cleanup.removeHandler(handler)
        cleanup.setLevel(old_level)
    line = stream.getvalue().strip()
    assert "cleanup op=job-2 repo=demo outcome=succeeded" in line
    assert line.endswith("ms=" + line.rsplit("ms=", 1)[1]) and " job=" not in line, line


def test_safe_name() -> None:
    assert safe_name("../..") == "_"
    assert safe_name("...") == "op"
    assert safe_name("a b/c") == "a_b_c"
    assert resources.outcome_of(None) == "succeeded"


def test_async_scope_cancels_and_awaits_tasks(tmp_path: Path) -> None:
    """Tasks still running at exit are cancelled and awaited; their finally blocks run."""
    import asyncio

    from workers.resources_async import AsyncResourceManager

    finished: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            finished.append(name)

    async def main() -> AsyncResourceManager:
        async with AsyncResourceManager("aop", temp_root=tmp_path) as scope:
            done = scope.create_task(asyncio.sleep(0), name="quick")
            await done
            scope.create_task(worker("a"), name="a")
            scope.create_task(worker("b"), name="b")
            await asyncio.sleep(0)
            assert scope.sync.live()["tasks"] == 2
            fh = scope.sync.open_file(tmp_path / "f", "w")
        assert fh.closed
        return scope

    scope = asyncio.run(main())
    assert finished == ["b", "a"]
    assert scope.sync.report is not None
    assert scope.sync.report.acquired["tasks"] == 3 and scope.sync.report.failures == []


def test_async_scope_reports_a_task_that_ignores_cancellation(tmp_path: Path) -> None:
    import asyncio

    from workers.resources_async import AsyncResourceManager

    async def stubborn(release: asyncio.Event) -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def main() -> list[tuple[str, str, str]]:
        release = asyncio.Event()
        with pytest.raises(RuntimeError, match="body failed"):
            async with AsyncResourceManager("aop2", grace=0.1) as scope:
                scope.create_task(stubborn(release), name="stubborn")
                await asyncio.sleep(0)
                raise RuntimeError("body failed")
        release.set()
        await asyncio.sleep(0.1)
        with pytest.raises(ResourceError, match="cannot acquire tasks"):
            scope.create_task(asyncio.sleep(0))
        assert scope.sync.report is not None
        return scope.sync.report.failures

    failures = asyncio.run(main())
    assert [f[0] for f in failures] == ["tasks"]


def test_hung_git_is_killed_by_its_watchdog_and_reaped(tmp_path: Path) -> None:
    """A git that never finishes (an alias running ``sleep``), streaming or not: killed at
    the timeout with a clear error; it and its own children are reaped."""
    from tasks.git import Git, _finish, run
    from workers.errors import SourceError

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    hang = ("-c", "alias.hang=!sleep 30", "hang")
    with ResourceManager("op-hang") as rm:
        git = Git(rm, tmp_path, timeout=0.5)
        with (pytest.raises(SourceError, match=r"git hang failed \(killed after the git timeout"),
              git._start(*hang) as proc):
            assert proc.stdout is not None
            proc.stdout.read()
            _finish(proc, "hang", git.expired)
        with pytest.raises(SourceError, match=r"git hang timed out after 0\.5s"):
            run(rm, ["git", *hang], 0.5, env={"PATH": os.environ["PATH"]}, what="hang")
        assert rm.live()["processes"] == 0 and rm.live()["threads"] == 0
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_git_that_dies_before_reading_its_requests_is_reported_as_such() -> None:
    """Writing requests to a dead ``git cat-file`` is EPIPE: the error says how git ended."""
    from collections import deque

    from tasks.git import Git
    from workers.errors import SourceError

    with ResourceManager("op-epipe") as rm:
        proc = rm.popen(["sh", "-c", "kill -9 $$"], stdin=subprocess.PIPE)
        proc.wait()
        with pytest.raises(SourceError, match=r"^git cat-file failed \(killed by signal 9\)$"):
            Git._request(proc, deque(), iter(["0" * 40] * 128), 128, set())
