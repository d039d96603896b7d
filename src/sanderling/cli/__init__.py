"""The `sanderling` command line."""
