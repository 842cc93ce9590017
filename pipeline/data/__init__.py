"""Corpus readers, conversations, chat rendering (ids + trainable), and the prepare stage."""
