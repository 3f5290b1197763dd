"""faultline controller: experiment engine, fleet view, CLI."""
