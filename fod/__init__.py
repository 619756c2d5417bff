"""FOD anomaly model: training, evaluation, ONNX export and the model package.

Importing this package does not import torch: the agent uses :mod:`fod.package`,
:mod:`fod.preprocess` and :mod:`fod.runner` on machines without it.

Thread pools: OpenMP (torch's intra-op pool and compiled kernels) is told to wait passively
(``OMP_WAIT_POLICY=PASSIVE``) unless the user set the variable. The default active wait spins each
worker at a barrier; when another process holds one of the cores, the spinning worker keeps the
thread that has work off that core and a training step slows ~25x (measured on 2 cores: 0.12-0.28
against 3.5-4.0 steps/s with passive waits; docs/results.md). Set before torch loads, so the first
``fod`` import must precede ``import torch`` for it to take effect.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
