"""Settings as data: frozen config groups whose field names are the flag names, built once at the
edge (the scripts, through cfm/cli/) or in Python (a notebook) and passed down; the library never
reads flags. Imports neither absl nor torch.

    choices.py     the values of enumerated settings and the published defaults (PAPER_CONFIG, ...)
    settings.py    `setting` (a field's default, bounds, choices), `check_config`, `flag_record`
    training.py    TrainConfig and its groups (FlowConfig, UNetConfig, OptimConfig, ...)
    evaluation.py  CheckpointSpec, the weights an evaluation scores; GuidanceConfig, how it samples labels
"""

from cfm.config.evaluation import CheckpointSpec, GuidanceConfig
from cfm.config.settings import check_config, flag_record
from cfm.config.training import (
    AnchorConfig,
    ClusterConfig,
    ConditionConfig,
    ExecutionConfig,
    FIDConfig,
    FlowConfig,
    LaunchConfig,
    LocalConfig,
    MonitorConfig,
    OptimConfig,
    PathsConfig,
    RunConfig,
    TrainConfig,
    UNetConfig,
)

__all__ = ["AnchorConfig", "CheckpointSpec", "ClusterConfig", "ConditionConfig", "ExecutionConfig", "FIDConfig", "FlowConfig", "GuidanceConfig",
           "LaunchConfig", "LocalConfig", "MonitorConfig", "OptimConfig", "PathsConfig", "RunConfig",
           "TrainConfig", "UNetConfig", "check_config", "flag_record"]
