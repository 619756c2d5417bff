"""Tests of ``fod bench`` (mirrors fod_tools/bench/)."""
