"""The node agent: owns br-int, compiles the node's desired state and keeps OVS equal to it."""
