"""Frozen dataclasses for what the network needs from Kubernetes objects, with validation."""
