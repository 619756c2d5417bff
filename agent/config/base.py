"""What every configuration section shares: unknown keys, inf and NaN rejected; the name rule of
cameras, ROIs and the agent id (each becomes an MQTT topic level).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NAME_HINT = "use letters, digits, '_', '-' or '.' (it becomes an MQTT topic level)"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # inf/NaN never valid

