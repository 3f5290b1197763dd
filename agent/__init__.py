"""faultline-agent: the node daemon that injects and reverts faults."""
