"""Pure compilers: model objects in, flows out. No I/O, no clock, no OVS."""
