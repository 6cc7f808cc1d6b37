"""Checkpoints: the manager (manager.py), its sharded parts (parts.py) and integrity checks
(integrity.py)."""
from megatron_ext.training.checkpoint.errors import CheckpointError
from megatron_ext.training.checkpoint.integrity import MANIFEST, verify, write_manifest
from megatron_ext.training.checkpoint.manager import (TRAIN_STATE, CheckpointManager,
                                                      list_checkpoints, read_train_state,
                                                      step_dir_name)
from megatron_ext.training.checkpoint.parts import (SHAPE_KEYS, ModelPart, OptimizerPart,
                                                    model_shape)

__all__ = ["CheckpointManager", "ModelPart", "OptimizerPart", "CheckpointError", "model_shape",
           "SHAPE_KEYS", "MANIFEST", "TRAIN_STATE", "verify", "write_manifest",
           "list_checkpoints", "read_train_state", "step_dir_name"]
