"""Flower ClientApp of fedmeta (see clients.app)."""
