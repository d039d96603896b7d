"""The cluster fed northbound to external SDN controllers (issue 15)."""
