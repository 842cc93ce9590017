"""The evaluation: the ground-truth task and its labels, the measures, the cells, the table."""
