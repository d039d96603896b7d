"""The lab's Kubernetes API server: the resources Sanderling consumes, stored in SQLite."""
