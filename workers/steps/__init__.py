"""The lifecycle of one operation, one concern per module, in the shape of dramatiq's
``middleware/``: each step is a ``before``/``after`` pair over one ``Operation``.

``workers.task.STEPS`` declares their order; ``OperationTask.__call__`` runs the befores in
that order, the task body, then the afters of the steps that began, in reverse (``base``).
"""
