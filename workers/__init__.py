"""The runtime of repoindex: how a worker process lives and dies. Knows nothing of indexing."""
