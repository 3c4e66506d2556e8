"""``metaseg-train``: the outer loop, two-stage runs, budget accounting, the best checkpoint."""
