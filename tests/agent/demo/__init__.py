"""Tests of the embedded demo (mirrors agent/demo/)."""
