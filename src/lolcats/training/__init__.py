"""Training: the shared trainer and the two LoLCATs stages."""
