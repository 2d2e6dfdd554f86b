"""Benchmarks and load drivers (commands, not CI tests): medians and ratios measured side
by side in one run. ``common`` is the one set-up they share; ``repoindex bench ...`` (the
``cli.bench`` commands) runs them."""
