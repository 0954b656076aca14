"""fedmeta: data."""
