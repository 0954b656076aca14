"""Federated meta-learning for cross-domain recommendation, runtime-agnostic (never imports flwr)."""
__version__ = "0.1.0"
