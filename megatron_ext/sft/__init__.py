"""The pretraining / SFT recipe on the shared engine."""
