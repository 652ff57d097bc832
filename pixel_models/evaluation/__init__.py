"""Evaluating a trained model on a whole split: exact NLL per image and per sub-pixel, and pictures of it."""
