"""Rounds of score, select and train in one run folder: run config, rounds, roles, slices, EMA, the run folder, the demo."""
