"""Conformance runners for the expectations in ../shared/conformance."""
