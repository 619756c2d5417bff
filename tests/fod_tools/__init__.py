"""Tests of the tooling package (mirrors fod_tools/)."""
