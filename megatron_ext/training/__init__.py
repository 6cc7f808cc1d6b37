"""The engine every recipe shares: model units (engine.py), the loop (loop.py), checkpoints
(checkpoint/), the one reduction helper (collectives.py), held-out evaluation, metrics."""
