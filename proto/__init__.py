"""faultline's wire contract: the only code the agent and the controller share."""

__version__ = "0.1.0"
