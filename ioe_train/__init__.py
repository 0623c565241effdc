"""ioe_train: FSDP2 pretraining of Qwen2.5-MoE models on pile-prep shards (docs/TRAINING.md).

The per-rank loop is `ioe_train.train.train`; `launch` starts it under torchrun. This file does
not import `ioe_train.train`: torchrun runs it as `-m ioe_train.train`, and a module imported by
its package before it runs as __main__ is loaded twice (runpy warns about it on every rank).
"""

from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.launch import LaunchOptions, launch

__all__ = ["ConfigError", "LaunchOptions", "TrainConfig", "launch", "load_config"]
