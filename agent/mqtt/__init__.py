"""The agent's MQTT link, one module per concept.

- :mod:`agent.mqtt.config`: the ``[mqtt]`` config models (pydantic only; :mod:`agent.config` imports
  it without loading paho or the outbox);
- :mod:`agent.mqtt.link`: :class:`~agent.mqtt.link.MqttLink`, the object the agent uses: lifecycle
  (start, stop, close) assembled from
- :mod:`agent.mqtt.publishers`: the ``publish_*`` API (status, camera state, result, alarm, images);
- :mod:`agent.mqtt.session`: the connection supervisor thread (connect, back-off, republish,
  in-order alarm delivery from the outbox);
- :mod:`agent.mqtt.commands`: the command queue and its thread;
- :mod:`agent.mqtt.base`: the state the parts share, the link's metrics and ``_publish``.

This package file imports nothing, so that loading the configuration loads no runtime module.
"""
