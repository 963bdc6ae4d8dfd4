"""Running fedmaml on a real federation: a SuperLink and one SuperNode per device
(docs/deployment.md).

* :mod:`~fedmaml.deploy.crypto`: TLS certificates and SuperNode authentication keys.
* :mod:`~fedmaml.deploy.commands`: the ``flower-superlink`` / ``flower-supernode`` command lines.
* :mod:`~fedmaml.deploy.superlink_server`: the SuperLink with its Control API on the operator's
  machine only (a fleet socket for devices, a control socket on 127.0.0.1).
* :mod:`~fedmaml.deploy.operator_token`: the credential the control socket requires of ``flwr``.
* :mod:`~fedmaml.deploy.warm_clientapps`: a SuperNode's ClientApp processes, forked from a process
  with torch and Flower loaded.
* :mod:`~fedmaml.deploy.supervisor`: ``flower-supernode`` and that launcher, watched: when either
  exits the other is stopped, and the error names what died.
* :mod:`~fedmaml.deploy.retry`: a SuperNode the SuperLink refuses, started again for a while.
* :mod:`~fedmaml.deploy.app_bundle`: the Flower app ``fedmaml deploy submit`` stages, from anywhere.
* :mod:`~fedmaml.deploy.flwr_config`: run-config files, ``[tool.flwr.app.config]``, connections.
* :mod:`~fedmaml.deploy.runs`: ``flwr run`` and waiting for a run's outcome.
* :mod:`~fedmaml.deploy.local`: the offline local SuperLink of the Flower-native ``flwr run .``.
* :mod:`~fedmaml.deploy.processes`: starting and stopping processes by PID.
* :mod:`~fedmaml.deploy.cli`: ``fedmaml deploy ...``.

The device side (memories on disk, the node's data path) lives with the ClientApp, in
:mod:`fedmaml.federated.node_config` and :mod:`fedmaml.federated.memory_store`.
"""
