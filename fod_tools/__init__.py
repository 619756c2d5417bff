"""Tooling above the runtime: the embedded demo and the benchmarks (``fod bench``).

Nothing of the runtime (:mod:`fod`, :mod:`calibration`, :mod:`engine_build`, :mod:`agent`) imports
this package; the console scripts load it lazily by name (``fod bench`` -> :mod:`fod_tools.bench.models`,
``fod-agent --demo`` -> :mod:`fod_tools.demo`). ``tests/test_import_graph.py`` enforces the direction.

- :mod:`fod_tools.demo`: synthetic conveyor, embedded broker, demo model package, ``fod-agent --demo``.
- :mod:`fod_tools.bench`: model latency per backend (:mod:`~fod_tools.bench.models`) and the
  end-to-end agent benchmark (:mod:`~fod_tools.bench.agent`).
"""
