"""FedMeta-MAML (Chen et al. 2018): federated MAML with ``H`` local meta-steps, first or second order.

Same local step as Per-FedAvg (``u = A(w; S)``, no memory); ``meta_gradient: second_order``
differentiates exactly through the (Lambda-restricted) adaptation.
"""

from fedmaml.algorithms.moml import MetaLearner

FEDMETA = MetaLearner("fedmeta", uses_memory=False)
