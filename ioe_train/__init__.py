"""ioe_train: FSDP2 pretraining of Qwen2.5-MoE models on pile-prep shards (docs/TRAINING.md).

The per-rank loop is `ioe_train.train.train`; `launch` starts it under torchrun.
"""

from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.launch import LaunchOptions, launch
from ioe_train.train import NonFiniteLossError

__all__ = ["ConfigError", "LaunchOptions", "NonFiniteLossError", "TrainConfig", "launch", "load_config"]
