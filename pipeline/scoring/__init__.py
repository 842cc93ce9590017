"""The scorer (NLL and attention importance), its kernels, batching, device budget, history cache, and the score stage."""
