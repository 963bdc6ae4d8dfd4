"""Which runs can train together as one vectorized batch (fedmaml/engines/run_batch.py): the key
that groups them and why a run cannot join one.

Apart from the batch's training, and light (the config alone; torch only to resolve
``engine.device: auto`` or to try a user's module): a sweep plans its batches before its worker
processes start, and importing the batch engine (torch, Flower, the checkpoint code) for it would
delay them by about 1.5 s.
"""

from __future__ import annotations

from fedmaml.config import Config, config_to_flat
from fedmaml.user_objects import is_user_object

#: Config keys whose values may differ between the runs of one batch: a run's identity and place,
#: its numbers (carried as tensors along the run axis), its evaluation (run per run), and settings
#: of the engines and of tracking that do not change a run's results.
PER_RUN_KEYS = ("name", "seed", "output_dir", "model.init_seed", "algorithm.eta", "algorithm.beta",
                "algorithm.alpha", "algorithm.hf_delta", "federated.server_lr",
                "federated.checkpoint_every", "federated.poll_interval")
PER_RUN_PREFIXES = ("tracking.", "evaluation.", "engine.")


def batch_refusal(cfg: Config) -> str | None:
    """Why ``cfg`` cannot run in a batch (``None``: it can)."""
    # "cuda" joins no batch even where it is missing: the run alone is then refused up front with
    # the error every engine gives (federated.setup.check_device)
    if cfg.engine.device == "cuda":
        return "batches run on the CPU"
    if cfg.engine.device != "cpu":  # "auto": the GPU where there is one
        from fedmaml.federated.setup import resolve_device

        if resolve_device(cfg.engine.device).type != "cpu":
            return "batches run on the CPU"
    # A user's module may be one vmap cannot batch (docs/custom.md); built-ins are written for it.
    if is_user_object(cfg.model.name):
        from fedmaml.engines.vectorized import unbatchable_reason
        from fedmaml.federated.setup import setup_for

        problem = unbatchable_reason(setup_for(cfg))
        if problem is not None:
            return f"torch.func.vmap cannot batch the model ({problem})"
    return None


def batch_key(cfg: Config) -> tuple:
    """Runs with equal keys share every shape and rule and can run as one batch."""
    return tuple((k, repr(v)) for k, v in config_to_flat(cfg).items()
                 if k not in PER_RUN_KEYS and not k.startswith(PER_RUN_PREFIXES))
