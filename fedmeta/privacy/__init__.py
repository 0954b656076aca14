"""fedmeta: privacy."""
