"""Open vSwitch processes and its database: the only code that starts OVS or edits OVSDB."""
