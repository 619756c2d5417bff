"""Tests of the agent package (mirrors agent/)."""
