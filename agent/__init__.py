"""fod-agent: the streaming runtime that scores camera frames and publishes results over MQTT.

The agent reads frames from cameras, video files, streams or image folders, runs a model package
(TensorRT or ONNX Runtime), decides OK/NG per region of interest and publishes scores, masks and
alarms over MQTT (:mod:`agent.mqtt`, payloads in :mod:`agent.schemas`, commands in
:mod:`agent.commands`). It does not import torch.
"""

from fod import __version__

__all__ = ["__version__"]
