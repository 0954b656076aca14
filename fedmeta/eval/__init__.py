"""fedmeta: eval."""
