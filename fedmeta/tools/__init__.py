"""Command-line tools above the mechanisms (partitioning, node administration)."""
