"""The small, named error hierarchy of repoindex.

``RepoindexError`` subclasses are *failures* a caller should read: their message is one
line, safe to show (no credentials), and ends up in the job status and the run ledger.
Control flow (requeue on shutdown) is not an error and is not modelled here.

``TransientError`` is the branch a later attempt may not meet; the operation base retries
it, together with the database's own transient failures (server restarted, backend
terminated, too many connections, serialization failure: ``workers.db.transient``).
"""

from __future__ import annotations


class RepoindexError(Exception):
    """Base of every failure that repoindex reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(RepoindexError):
    """The environment holds an invalid setting."""


class BadInput(RepoindexError):
    """A job's arguments or source are malformed, refused or unreachable."""


class SourceError(RepoindexError):
    """Git could not read the source (not a repository, unknown ref, clone failed)."""


class LimitExceeded(RepoindexError):
    """The repository exceeds a configured limit (files, time)."""


class ResourceError(RepoindexError):
    """The resource scope was misused (acquire after close) or could not acquire."""


class TransientError(RepoindexError):
    """A failure a later attempt may not meet: retried by ``RetryingOperation``."""


class PoolTimeout(TransientError, ResourceError):
    """No pooled database connection within REPOINDEX_DB_POOL_TIMEOUT."""


class Revoked(BaseException):
    """Raised in a worker child when its running operation is revoked with terminate=True:
    a BaseException, so that no ``except Exception`` in the operation swallows it; the
    scope rolls back and cleans up as it does for shutdown's SystemExit."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"revoked while it ran (revoke terminate=True); rolled back: {job_id}")
        self.job_id = job_id
