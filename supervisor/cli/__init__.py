"""Command line: `supervisor run | check | status | ...`, the log viewer, the demo and replay.
Imports are lazy, so each command loads only what it uses."""
