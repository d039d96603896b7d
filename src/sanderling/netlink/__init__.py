"""Kernel plumbing through pyroute2: network namespaces, veth pairs, addresses and routes."""
