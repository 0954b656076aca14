"""fedmeta: runtime."""
