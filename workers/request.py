"""The worker's view of a received job, without the credentials its arguments may hold.

A source URL may carry a token (``https://TOKEN@host/x.git``). Celery shows a job's
arguments in the ``task-received`` event (what Flower displays and keeps), in ``inspect
active``/``reserved`` and in its log lines; this request class gives all of them the
scrubbed form. The task body still receives the arguments as sent.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from workers.scrub import scrub, scrub_value


class ScrubbedRequest(Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Celery reads these two attributes for the event, inspect and its log lines
        self._argsrepr: str = scrub(self.argsrepr or repr(scrub_value(self.args)))
        self._kwargsrepr: str = scrub(self.kwargsrepr or repr(scrub_value(self.kwargs)))

    def info(self, safe: bool = False) -> Any:
        doc = dict(super().info(safe=safe))
        if not safe:
            doc["args"], doc["kwargs"] = scrub_value(doc["args"]), scrub_value(doc["kwargs"])
        return doc
