"""The ResourceManager for async code: the same scope, which also owns asyncio tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from workers.errors import ResourceError
from workers.resources import ResourceManager


class AsyncResourceManager:
    """``async with``: the same scope for async code, which also owns asyncio tasks.

    On exit, live tasks are cancelled newest first and awaited (up to the grace period) so
    their own ``finally`` blocks run before the synchronous resources are released.
    """

    def __init__(self, op_id: str, **kw: Any) -> None:
        self.sync = ResourceManager(op_id, **kw)
        self._tasks: dict[asyncio.Task[Any], None] = {}

    async def __aenter__(self) -> AsyncResourceManager:
        self.sync.open()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        live = [t for t in reversed(self._tasks) if not t.done()]
        for task in live:
            task.cancel()
        if live:
            await asyncio.wait(live, timeout=self.sync._grace)
        self.sync.__exit__(et, ev, tb)

    def create_task(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None
                    ) -> asyncio.Task[Any]:
        """Start a task owned by this scope."""
        try:
            self.sync._require_open("tasks")
        except ResourceError:
            coro.close()  # refused: never leave a coroutine that is not awaited
            raise
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = None
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

        def still_running() -> None:
            if not task.done():
                raise ResourceError(f"task {task.get_name()} did not stop when cancelled")

        self.sync.track("tasks", task, still_running, lambda: not task.done(),
                        label=task.get_name())
        return task
