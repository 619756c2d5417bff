"""The agent's configuration: ``config.toml`` parsed into strict pydantic models.

Every section forbids unknown keys, every field has a description (``docs/config.md`` is generated
from them by :func:`config_reference_markdown`) and units are in the field names. Errors name the
file, the key (``cameras.0.rois.1.box_px``) and the fix. CLI flags override the file through
:func:`load_config`'s ``overrides`` (dotted keys). Relative paths are relative to the working
directory of the agent; unset state paths (outbox, snapshots) go to the state directory
(:mod:`agent.statedir`), never into the working directory.

The package, by concept: :mod:`agent.config.cameras` (cameras and ROIs), :mod:`agent.config.sections`
(model, decision, pipeline, HTTP, snapshots, logging), :mod:`agent.mqtt.config` (``[mqtt]``, beside
its owner), :mod:`agent.config.loader` (the whole configuration, loading, errors) and
:mod:`agent.config.reference` (``docs/config.md``). The public names are re-exported here.
"""

from __future__ import annotations

from agent.config.cameras import CameraConfig, RoiConfig, SourceKind
from agent.config.loader import AgentConfig, load_config
from agent.config.reference import config_reference_markdown
from agent.config.sections import (
    DecisionConfig,
    HttpConfig,
    LoggingConfig,
    ModelConfig,
    PipelineConfig,
    SnapshotConfig,
)
from agent.mqtt.config import MqttConfig

__all__ = [
    "AgentConfig",
    "CameraConfig",
    "DecisionConfig",
    "HttpConfig",
    "LoggingConfig",
    "ModelConfig",
    "MqttConfig",
    "PipelineConfig",
    "RoiConfig",
    "SnapshotConfig",
    "SourceKind",
    "config_reference_markdown",
    "load_config",
]
