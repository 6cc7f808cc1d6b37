"""The one error a checkpoint raises."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and the reason."""
