"""Selection methods, per-sample and corpus-wide top-k, keep tables and masks, mask agreement, and the select stage."""
