"""The CNI plugin shim (standard library only)."""
