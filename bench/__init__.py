"""``fedmeta-bench``: performance and quality figures of fedmeta, written to BENCHMARKS.md."""
