"""The embedded demo: a synthetic conveyor, an embedded MQTT broker and ``fod-agent --demo``."""
