"""Celery's settings, flat and with Celery's names, read from the environment.

The shutdown, delivery and memory policy of the fleet is written here as data; README's
"Shutdown" section explains each line.
"""

from __future__ import annotations

from workers.settings import process_settings

_settings = process_settings()

include = ["tasks.jobs"]

broker_url = _settings.redis_url
result_backend = _settings.result_backend
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # wait for Redis with backoff instead of exiting

# JSON only: pickle would let any producer run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Delivery: ack after the operation, so a job interrupted by shutdown or a dead child is
# delivered again; prefetch one so a stopping worker holds as few jobs as possible.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_track_started = True
# On a lost broker connection, operations in flight run on. Celery's alternative (True)
# cancels them, but with Redis as broker *and* result backend its cancel path fails to
# store RETRY, then marks the job REVOKED and acknowledges it: the job is lost (seen in
# tests/e2e/test_faults.py). Running on is safe: the unacked message is redelivered after
# the visibility timeout and the repeated operation is idempotent.
worker_cancel_long_running_tasks_on_connection_loss = False
# Not extended: an extended result keeps the job's arguments (a source URL may hold a
# token) in Redis for result_expires; the run ledger keeps task and repository per job id.
result_extended = False
result_expires = _settings.result_expires

# Redis redelivers a message that was taken but never acked after this many seconds
# (a worker that vanished without returning it). Longer than the longest operation.
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    # a half-open connection (a partition) fails within REPOINDEX_NET_TIMEOUT, not ~2 h
    "socket_timeout": _settings.net_timeout,
    "socket_connect_timeout": min(_settings.net_timeout, 10),
    "socket_keepalive": True,
}
redis_socket_timeout = _settings.net_timeout
redis_socket_connect_timeout = min(_settings.net_timeout, 10)
redis_socket_keepalive = True
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}
# Workers retry storing a result for minutes (workers/app.py); producers ask once.

worker_concurrency = _settings.concurrency or None
# KiB; compared with the child's peak RSS after each task (README "Memory"): a child that
# grew past it is replaced between operations, never during one.
worker_max_tasks_per_child = _settings.max_tasks_per_child or None
worker_max_memory_per_child = _settings.max_memory_per_child_mb * 1024 or None
# A new child that has not said it is up within this many seconds is SIGKILLed by Celery
# (asynpool.verify_process_alive). The default, 4 s, is met on an idle host but not always
# on a loaded one, where the kill shows up as a child that "died" and is replaced again.
worker_proc_alive_timeout = 30.0
worker_hijack_root_logger = False
worker_send_task_events = True
task_send_sent_event = True
