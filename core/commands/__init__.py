"""CLI subcommands: each module here exposes `register(subparsers)`; cli.py picks them all up."""
