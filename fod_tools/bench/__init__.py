"""``fod bench``: model latency (:mod:`.models`) and the end-to-end agent benchmark (:mod:`.agent`)."""
