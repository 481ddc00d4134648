"""The loop: connects drivers to the machine (`service`), publishes status, takes requests from
the shell (`control`) and applies reloads (`reload`)."""
