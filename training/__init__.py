"""Training scripts (pretraining, fine-tuning, mixer studies) and the machinery they share (``common``)."""
