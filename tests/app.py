"""The worker app of the end-to-end tests: the product app plus the probe tasks."""

from tests import probe_tasks  # noqa: F401 - registers the probe tasks
from workers.app import app

__all__ = ["app"]
