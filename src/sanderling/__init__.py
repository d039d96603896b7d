"""Sanderling: SDN networking for Kubernetes on Open vSwitch, programmed as OpenFlow."""

VERSION = __version__ = "0.1.0"  # pyproject.toml says the same (a test keeps them equal)
