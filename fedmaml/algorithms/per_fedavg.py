"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020): MAML-style local steps, FO or Hessian-free.

It is MOML with ``beta = 1`` (the memory is replaced by ``A(w; S)`` every time, so none is kept):
``meta_gradient: first_order`` is Per-FedAvg(FO) and ``hessian_free`` is Per-FedAvg(HF), whose
Hessian-vector product uses an independent batch ``S'``.
"""

from fedmaml.algorithms.moml import MetaLearner

PER_FEDAVG = MetaLearner("per_fedavg", uses_memory=False)
