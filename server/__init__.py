"""Flower-side entry points of fedmeta: the ServerApp, the simulation and deployment launchers."""
