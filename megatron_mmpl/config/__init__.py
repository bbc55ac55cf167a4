"""Run configuration: typed sections (schema.py), YAML + overrides (load.py), checks (validate.py)."""

from megatron_mmpl.config.load import ConfigError, dump_yaml, field_docs, from_dict, load_config, to_dict
from megatron_mmpl.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
)
from megatron_mmpl.config.validate import train_steps, validate_config, validate_layout, warmup_steps

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "ScheduleConfig", "dump_yaml", "field_docs", "from_dict", "load_config", "to_dict",
    "train_steps", "validate_config", "validate_layout", "warmup_steps",
]
