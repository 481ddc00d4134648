"""Drivers: one module per thing the supervisor touches (the app process, git, builds, releases,
health probes, the stats file, sockets, output, sd_notify, the webhook, state and log files).
They report facts and carry out actions; they never decide, and never import the loop or the CLI."""
