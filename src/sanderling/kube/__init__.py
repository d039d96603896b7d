"""The Kubernetes API as the agent uses it (lightkube), the same against a real cluster or the lab."""
