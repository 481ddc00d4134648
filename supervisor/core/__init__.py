"""The pure core: every decision (`machine`), the vocabulary (`events`), the drain language
(`condition`) and the config as data (`config`, `settings`). Imports nothing outside the core."""
