"""Training: the trainer loop, optimizer and schedule, metrics."""
