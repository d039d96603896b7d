"""Sanderling: SDN networking for Kubernetes on Open vSwitch, programmed as OpenFlow."""

__version__ = "0.1.0"
