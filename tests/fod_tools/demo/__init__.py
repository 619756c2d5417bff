"""Tests of the embedded demo (mirrors fod_tools/demo/)."""
