"""Reading a factorial experiment's folders: its cells (metrics, config, cell.json, diagnostics,
cost), their axes and arms, which cells cannot count, the setup they ran and a tuned grid's tuning
runs. Imports nothing else of the report."""
