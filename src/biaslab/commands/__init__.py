"""CLI commands of the methods, one module each; see biaslab.cli.COMMAND_MODULES."""
