"""``python -m cli``: the ``repoindex`` console script."""

from cli import run

run()
