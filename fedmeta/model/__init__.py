"""fedmeta: model."""
