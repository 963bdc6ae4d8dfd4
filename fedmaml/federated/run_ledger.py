"""One run's bookkeeping: its run directory, trackers, health, checkpoints and end.

A :class:`RunLedger` is made per run, by the ServerApp path (``run_federated``,
fedmaml/federated/server_app.py) and by each run of a batch (fedmaml/engines/run_batch.py). Whoever
trains the run hands it what the run did: its metrics rows (:meth:`RunLedger.record`), its server
state and memories when a checkpoint is due (:meth:`RunLedger.save_checkpoint`), and its model and
the server's summary parts at the end (:meth:`RunLedger.finish`). The ledger writes config.yaml,
metrics.jsonl, checkpoint.pt, summary.json, model.pt and convergence.png (fedmaml/results/recorder.py,
fedmaml/federated/checkpoint.py), logs to the trackers of ``tracking`` (fedmaml/tracking/), and
stops the run through its health rules (fedmaml/federated/health.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmaml.config.schema import Config
from fedmaml.core.params import Params
from fedmaml.core.patterns import pattern_steps
from fedmaml.errors import FedmamlError
from fedmaml.federated import checkpoint, faults
from fedmaml.federated.health import RunHealth
from fedmaml.federated.pattern_selection import write_selection
from fedmaml.federated.server_state import ServerState
from fedmaml.provenance import run_provenance
from fedmaml.results.metrics_row import MetricsRow
from fedmaml.results.plots import Curves, plot_run
from fedmaml.results.recorder import RunRecorder
from fedmaml.results.run_files import parse_metrics
from fedmaml.tracking import open_tracker

log = logging.getLogger("fedmaml")


def run_health(cfg: Config) -> RunHealth:
    """The health rules of a run, with what to try when it diverges. With privacy noise, the
    noise comes first: its scale (z C / d on every coordinate of the mean update, docs/privacy.md)
    does not shrink with algorithm.eta."""
    lr = cfg.federated.server_lr
    hint = f"a smaller algorithm.eta (now {cfg.algorithm.eta:g}) or federated.server_lr (now {lr:g})"
    z, c = cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm
    if z > 0:  # noise needs clipping (a config rule), so d is the private mean's constant
        from fedmaml.core.privacy import noise_std
        from fedmaml.federated.participation import client_sampling

        sampling = client_sampling(cfg.federated, cfg.data.num_clients)
        d = sampling.expected_size
        if sampling.scheme == "all":
            cohort, more = f"d = {d:g} silos, data.num_clients", ""
        else:
            key = ("federated.clients_per_round" if cfg.federated.clients_per_round
                   else "federated.fraction")
            cohort, more = f"d = {d:g} clients per round, {key}", f"raise {key}, "
        hint = (f"less privacy noise, which algorithm.eta does not change: each round adds noise "
                f"of std z C / d = {z:g} x {c:g} / {d:g} = {noise_std(z, c, d):.3g} to every "
                "coordinate of the mean update (a norm of std x sqrt(parameters), against at most "
                f"C for the clipped updates' mean; z = privacy.noise_multiplier, "
                f"C = privacy.clipping_norm, {cohort}); {more}lower privacy.noise_multiplier "
                "(a larger epsilon) or privacy.clipping_norm (towards the updates' norms: "
                "summary.json privacy.max_update_norm), or damp the noise with a smaller "
                f"federated.server_lr (now {lr:g}); a smaller algorithm.eta "
                f"(now {cfg.algorithm.eta:g}) shrinks only the clients' updates")
    return RunHealth(cfg.federated.max_failed_rounds, hint=hint, rounds=cfg.federated.rounds)


class RunLedger:
    """The bookkeeping of the run of ``cfg`` in ``run_dir``. ``resume``: continue from the run
    directory's checkpoint (its config must match, fedmaml/federated/checkpoint.py); ``rng``: also
    put the process's random generators back as they were (a run alone; a batch's runs draw from
    counter-based streams, and one process's generators cannot hold several runs' states).
    ``metric``: the evaluation metric the summary and the progress line report."""

    def __init__(self, cfg: Config, run_dir: str | Path, metric: str, *, resume: bool = False,
                 rng: bool = True) -> None:
        self.cfg, self.dir, self.metric = cfg, Path(run_dir), metric
        #: what the log's lines about the run start with (a batch names its runs)
        self.label = ""
        saved = checkpoint.load(run_dir) if resume else None
        self.recorder = RunRecorder(run_dir, cfg, metrics=saved["metrics"] if saved else None)
        #: what the run's figure draws, gathered as rows are written (the resumed ones first)
        self.curves = Curves.of(parse_metrics(saved["metrics"].splitlines())) if saved \
            else Curves()
        self.tracker = open_tracker(cfg, run_dir)
        self.health = run_health(cfg)
        #: what the summary reports besides the health totals (kept in checkpoints): faults
        #: injected, the first and last evaluation, the running clock and the provenance of the
        #: code, taken at the run's start (fedmaml/provenance.py)
        self.state = {"injected": {k: 0 for k in faults.KINDS}, "first_eval": {}, "last_eval": {},
                      "seconds": 0.0, "provenance": run_provenance()}
        #: the round the last evaluation was made at (unknown after a resume)
        self.eval_round: int | None = None
        #: the checkpoint resumed from: the round it was written after, its clock, the server's
        #: state and every client's memory (None: a new run)
        self.resumed: tuple[int, float, ServerState, dict[str, Any]] | None = None
        if saved is not None:
            self.health.restore(saved["health"])
            self.state = saved["app"]
            self.state["provenance"] = run_provenance(self.state.get("provenance"))  # the first
            # segment's stays
            if rng:
                checkpoint.set_rng_state(saved["rng"])
            self.resumed = (int(saved["round"]), float(saved["seconds"]),
                            ServerState.from_checkpoint(saved["strategy"]), saved["memories"])

    # -- rounds -----------------------------------------------------------------------------------
    def record(self, rows: Iterable[MetricsRow], last_error: str = "") -> list[dict[str, Any]]:
        """Write rows, in order, to metrics.jsonl and the trackers, and account for them; return
        them as written. Each row is in the file before the health rules see it (a crash or a kill
        there keeps it). Raises :class:`~fedmaml.federated.health.RunStopped` at the row after
        which the run must stop (the rows after it are not written)."""
        written: list[dict[str, Any]] = []
        faulty = faults.enabled(self.cfg)
        for row in rows:
            if row.round > 0 and faulty:  # what was injected, beside what was counted
                if row.injected is None:  # (a batch drew its clients' faults already)
                    row.injected = faults.injected(self.cfg, row.clients or [], row.round)
                for k, n in row.injected.items():
                    self.state["injected"][k] += n
            written.append(d := row.as_dict())
            self.recorder.log_round(d)
            self.state["seconds"] = row.seconds
            self.tracker.log_round(d)
            if row.pattern_selection is not None:  # the table also gets a file of its own
                write_selection(self.dir, row.pattern_selection)
            self.curves.add((d,))
            self.health.observe(d, last_error)  # raises RunStopped: diverged or failed
            self._note_evaluation(row)
        return written

    def _note_evaluation(self, row: MetricsRow) -> None:
        """Keep an evaluation row's metrics as the run's last (and, the first time, first) ones."""
        if row.eval is not None:
            self.state["last_eval"] = dict(row.eval)
            if not self.state["first_eval"]:
                self.state["first_eval"] = dict(row.eval)
            self.eval_round = row.round

    def progress_info(self, row: Mapping[str, Any]) -> str:
        """The progress line's info: the last evaluation first, with the round it was made at (it
        stays the same between evaluations), then this round's training loss and replies."""
        parts = []
        shown = self.state["last_eval"].get(f"seen.{self.metric}.mean")
        if shown is not None:
            at = f" @r{self.eval_round}" if self.eval_round is not None else ""
            parts.append(f"eval {self.metric} {shown:.4g}{at}")
        if "loss_after" in row:
            parts.append(f"train {row['loss_after']:.4g}")
        if "replies" in row:
            failed = f", {row['failures']} failed" if row["failures"] else ""
            parts.append(f"replies {row['replies']}/{len(row['clients'])}{failed}")
        return " | ".join(parts)

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_due(self, server_round: int, stop: bool) -> bool:
        """Whether a checkpoint is written after ``server_round``: every ``checkpoint_every``
        rounds, and at a stop request (``stop``), but never after the last round."""
        every = self.cfg.federated.checkpoint_every
        return server_round < self.cfg.federated.rounds and (
            stop or bool(every and server_round > 0 and server_round % every == 0))

    def save_checkpoint(self, server_round: int, server: ServerState,
                        memories: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> None:
        """The run's checkpoint after ``server_round``. ``memories``: every client's memory, or a
        function asking for them, which may fail (a device that does not answer): then the
        previous checkpoint, if any, stays."""
        if callable(memories):
            try:
                memories = memories()
            except FedmamlError as e:
                log.warning("round %d: no checkpoint written: %s", server_round, e)
                return
        checkpoint.save(self.dir, {
            "round": server_round, "seconds": self.state["seconds"], "rng": checkpoint.rng_state(),
            "strategy": server.to_checkpoint(), "memories": dict(memories),
            "health": self.health.state(), "app": self.state, "metrics": self.recorder.text()},
            self.cfg)

    # -- the end ----------------------------------------------------------------------------------
    def summary(self, status: str, message: str, server: Mapping[str, Any]) -> dict[str, Any]:
        """summary.json of a run that ended with ``status`` (``message``: why it stopped early;
        ``server``: the strategy's ``summary_parts``)."""
        cfg, state = self.cfg, self.state
        summary = {
            "name": cfg.name,
            "algorithm": cfg.algorithm.name,
            "status": status,
            **({"message": message} if message else {}),
            "rounds": cfg.federated.rounds,
            **self.health.totals(),
            **({"injected": state["injected"]} if faults.enabled(cfg) else {}),
            "metric": self.metric,
            # what runs: a written-out pattern has its own step count (core/patterns.py)
            "eval_steps": pattern_steps(cfg.evaluation.pattern, cfg.evaluation.steps),
            "before": {k: v for k, v in state["first_eval"].items() if not k.endswith(".clients")},
            "after": {k: v for k, v in state["last_eval"].items() if not k.endswith(".clients")},
            "seconds": state["seconds"],
            **server,
        }
        if state.get("config_changes"):  # what a resume changed, and when (fedmaml/run_dir.py)
            summary["config_changes"] = state["config_changes"]
        return summary

    def finish(self, status: str, message: str, model: Params, server: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """End the run: summary.json (``extra`` added to it), model.pt (``model``: the last good
        one), convergence.png, the trackers' runs; the checkpoint goes unless the run was
        interrupted (it is what a resume continues from). Returns the summary."""
        if status != "completed":
            (log.warning if status == "interrupted" else log.error)("%s%s", self.label, message)
        summary = {**self.summary(status, message, server), **(extra or {})}
        self.recorder.finish(summary, model, self.state["provenance"])
        if status != "interrupted":  # the summary says what the run became; nothing to resume
            checkpoint.remove(self.dir)
        plot_run(self.dir, curves=self.curves)
        self.tracker.finish(summary, self.dir)
        return summary

    def abort(self, error: BaseException) -> None:
        """A crash: the trackers' runs end too, as what happened."""
        self.tracker.abort("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")

