"""Subcommands; each module has ``register(subparsers)``.  Only this layer prints."""
