"""The held-out protocol and what is built on it: validation tasks, tuning, the random-init baseline, reports."""
