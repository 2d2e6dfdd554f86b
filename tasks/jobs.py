"""The Celery tasks: thin wrappers, registered under stable names other services use.

Each runs inside the ResourceManager scope that ``OperationTask`` opens; arguments are
JSON and validated here, so a malformed job fails with a one-line reason.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.utils.time import get_exponential_backoff_interval

from tasks import indexer, validate
from workers import db, resources, runtime
from workers.errors import BadInput
from workers.task import OperationTask


class RetryingOperation(OperationTask):
    """An operation retried with backoff on a transient failure (``workers.db.transient``:
    server restarted, backend terminated, pool timeout), wherever in the lifecycle it
    happens, the run ledger's row included: indexing and deleting are idempotent, so a
    retry is always safe. Anything else (e.g. a program limit exceeded) fails at once."""

    abstract = True
    retry_backoff = 1
    retry_backoff_max = 30
    max_retries = 3

    def failed(self, error: Exception) -> BaseException:
        if not db.transient(error):
            return error
        countdown = get_exponential_backoff_interval(
            factor=self.retry_backoff, retries=self.request.retries,
            maximum=self.retry_backoff_max, full_jitter=True)
        try:  # Retry (sent), or ``error`` itself once max_retries is exceeded
            return self.retry(exc=error, countdown=countdown, throw=False)
        except Exception as final:
            return final


@shared_task(name="repoindex.index_repository", base=RetryingOperation,
             bind=True)
def index_repository(self: OperationTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """index_repository(source, name=None, ref="HEAD") -> summary."""
    settings = runtime.current().settings
    parsed = validate.index_args(args, kwargs, settings.roots)
    return indexer.index_repository(resources.current(), settings, parsed,
                                    job_id=self.request.id or "local",
                                    progress=self.progress())


@shared_task(name="repoindex.delete_repository", base=RetryingOperation,
             bind=True)
def delete_repository(self: OperationTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """delete_repository(name) -> {repository, deleted, files, blobs}."""
    return indexer.delete_repository(resources.current(), validate.delete_args(args, kwargs))


@shared_task(name="repoindex.collect_garbage", base=OperationTask, bind=True)
def collect_garbage(self: OperationTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """collect_garbage() -> {blobs}: delete blobs that no repository references."""
    validate.bind_arguments(args, kwargs, (), required=0)
    return indexer.collect_garbage(resources.current())


@shared_task(name="repoindex.canary", base=OperationTask, bind=True)
def canary(self: OperationTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """canary(seconds=1.0) -> {job, seconds}: a diagnostic operation holding a temp file,
    a git process and a transaction for ``seconds`` (at most 3600)."""
    bound = validate.bind_arguments(args, kwargs, ("seconds",), required=0)
    seconds = bound.get("seconds", 1.0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) \
            or not 0 <= seconds <= 3600:
        raise BadInput("seconds must be a number from 0 to 3600")
    return indexer.canary(resources.current(), runtime.current().settings,
                          job_id=self.request.id or "local", seconds=float(seconds))
