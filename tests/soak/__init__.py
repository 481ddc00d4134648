"""The chaos soak of issue 7: `python -m tests.soak.soak --seed N --minutes M` (docs/soak.md)."""
