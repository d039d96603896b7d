"""IP address management: node pod subnets, requested addresses, crash-safe allocations."""
