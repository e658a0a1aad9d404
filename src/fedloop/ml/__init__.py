"""Machine-learning adapters, data loaders and partitioners; importing this needs only numpy.

Submodules: ``data`` (dataset loaders from local files), ``partition`` (split a dataset among
agents), ``torch`` (PyTorch <-> Weights, FedProx/SCAFFOLD/FedCurv helpers; needs torch),
``models`` and ``engines`` (ready ML engines; need torch), ``sklearn`` (scikit-learn models
<-> Weights; needs scikit-learn).
"""

from __future__ import annotations
