"""The administrator's `gateway` command: one module per family of subcommands."""
