"""FOD anomaly model: training, evaluation, ONNX export and the model package.

Importing this package does not import torch: the agent uses :mod:`fod.package`,
:mod:`fod.preprocess` and :mod:`fod.runner` on machines without it.
"""

__version__ = "0.1.0"
