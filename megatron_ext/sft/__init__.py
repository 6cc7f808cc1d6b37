"""The pretraining / SFT recipe on the shared engine (megatron_ext.training)."""
