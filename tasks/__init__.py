"""The work of repoindex: reading git, classifying, storing, searching, and the CLI."""
