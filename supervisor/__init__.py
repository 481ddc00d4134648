"""supervisor: keep one server program running and up to date with its git branch."""

__version__ = "0.1.0"
