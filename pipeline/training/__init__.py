"""Tokens joined to keep masks, masked loss, the train step, fine-tuning, the train stage, and export."""
