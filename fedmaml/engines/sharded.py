"""The sharded engine: the vectorized engine's cohorts split over Ray actors, nodes and GPUs.

``engine.name: sharded`` runs ``engine.shards`` Ray actors, each a ``ShardWorker``
(fedmaml/engines/shards.py). Actor ``k`` owns the clients whose id is ``k`` modulo ``shards`` and
their memory bank (RAM, the GPU it runs on, or memory-mapped files under
``engine.memory_dir/shard-k``), and trains its part of every round's cohort as one vmapped call
with the vectorized engine's own grid. This module is the driver's side: a Flower ``Grid`` that
takes cohorts, like the vectorized engine's, so the strategy and its server round are the same as
on every engine:

1. a cohort instruction (``w_r`` once, the sampled ids) becomes one message per shard, ``w_r`` once
   per shard; the shards work at the same time;
2. the shards' replies are joined in shard order into the one cohort reply the strategy reads.
   When the server round takes the plain mean (no server rule, no differential privacy), each
   shard sends its part of it instead of its rows: the weighted sum of its usable updates in
   client-id order (fedmaml/federated/server_round.py ``part_sum``; one update's bytes per shard,
   not one per client), with every client's metrics and which updates it rejected, and the server
   round adds the parts in shard order (``aggregate_parts``): one shard gives the single-process
   numbers to the bit, more shards to float rounding. Otherwise the shards send their rows, which
   the strategy orders by client id before it averages. Evaluation rows come back in the panel's
   order;
3. per-client messages (discovery, pattern selection) go to the actor of their client.

Actors are placed with Ray's resources: ``engine.num_cpus`` and ``engine.num_gpus`` (fractions share
a device) per actor, in one placement group (``engine.placement``: spread over nodes by default).
``engine.ray_address`` joins a running cluster; empty starts a local Ray instance for the run,
recorded and stopped like the Ray engine's (fedmaml/engines/ray_session.py).

**An actor that dies** (its process killed, its node gone): the shard's clients of that round count
as failed (kind ``error``, the reason names the shard). Then:

* when the shard's memories have not moved since the last checkpoint (the algorithm keeps none;
  or a checkpoint was written after the last round the shard trained in, e.g. with
  ``federated.checkpoint_every: 1``), nothing is lost: a new actor is started (on any node with
  the resources, a node that came back included; the run waits up to ``engine.discovery_timeout``
  seconds for one), the shard's memories are read back from the run's checkpoint, and the run goes
  on;
* otherwise the memories of its clients since the last checkpoint are lost: the round still
  completes (and is recorded), and the run stops before the next round's training with status
  ``interrupted`` and a message naming the command that resumes it (``fedmaml run --resume
  RUN_DIR``); the resumed run continues from the checkpoint on all shards, as if the failure never
  happened. Without a checkpoint to resume from, the status is ``failed``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from flwr.app import Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedmaml.config import Config
from fedmaml.engines import ray_engine, ray_session
from fedmaml.engines.inprocess import FIRST_CLIENT_NODE, InProcessGrid, run_inprocess
from fedmaml.engines.shards import (Detached, ShardAnswer, ShardWorker, merge_bank_states,
                                    merge_evaluate, merge_train, shard_message, shard_of, split,
                                    split_bank_state)
from fedmaml.engines.vectorized import refuse_unbatchable, set_message_id
from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.federated import checkpoint
from fedmaml.federated import records as R
from fedmaml.federated.health import RunStopped
from fedmaml.federated.setup import setup_for
from fedmaml.results.run_files import resume_command

log = logging.getLogger("fedmaml")

#: Resident memory of an idle shard actor (its imports: torch, Flower, Ray, the data), as
#: measured in docs/performance.md ("The sharded engine"): a local instance refuses more shards
#: than the machine's memory holds.
ACTOR_BYTES = 620 * 2**20

#: Seconds between attempts to start a shard's actor whose previous attempt died at once.
RETRY_SECONDS = 0.5


@dataclass(frozen=True)
class BankShape:
    """What a resume asks of a grid's memory bank (checkpoint.restore_memories): its size."""

    num_clients: int


class ShardedGrid(InProcessGrid):
    """A grid whose cohorts are trained by ``engine.shards`` Ray actors (call :meth:`close`)."""

    #: The strategy sends one train (and evaluate) message per cohort (federated.strategy).
    takes_cohorts = True

    def __init__(self, config: Config, num_nodes: int, run_dir: str | Path | None = None) -> None:
        super().__init__(None, num_nodes)  # type: ignore[arg-type] - every message goes to a shard
        self.cfg, self.run_dir = config, (Path(run_dir) if run_dir is not None else None)
        setup = setup_for(config)
        refuse_unbatchable(setup)
        self.like = setup.initial_params
        self.keeps_memory = setup.algorithm.uses_memory
        self.bank = BankShape(setup.federation.num_clients)
        self.shards = config.engine.shards
        self._round = 0  # the last training round seen
        self._dirty: set[int] = set()  # shards whose memories moved since the last checkpoint
        #: the round whose end the last checkpoint holds (None: none yet; "resumed": the one this
        #: run resumed from, its round known at the first training round)
        self._synced: int | str | None = None
        self._lost: dict[int, str] = {}  # shard -> why its memories are lost
        self._revive: dict[int, str] = {}  # shard -> why it needs a new actor (nothing lost)
        self.deaths: list[dict[str, Any]] = []  # every actor that died: shard, round, reason
        self.actors = ShardActors(config, num_nodes)

    def close(self) -> None:
        self.actors.stop()

    # -- Grid API -------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        trains = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        for m in trains:
            config = m.content.get(R.CONFIG) if m.has_content() else None
            self._note_round(int(config.get(R.ROUND, 0)) if config is not None else 0)
        if trains and self._lost:
            self._stop()
        self._revive_shards()
        outbox: list[list[Message]] = [[] for _ in range(self.shards)]
        cohorts: dict[int, list[list[int]]] = {}  # message index -> its clients per shard
        for i, msg in enumerate(messages):
            set_message_id(msg)
            ids = R.cohort_ids(msg)
            if ids is not None and msg.metadata.message_type in (MessageType.TRAIN,
                                                                 MessageType.EVALUATE):
                cohorts[i] = split([int(c) for c in ids], self.shards)
                for k, part in enumerate(cohorts[i]):
                    if part:
                        outbox[k].append(shard_message(msg, part, FIRST_CLIENT_NODE))
                        outbox[k][-1].metadata.__dict__["_message_id"] = _part_id(msg, k)
            else:
                outbox[shard_of(msg.metadata.dst_node_id - FIRST_CLIENT_NODE,
                                self.shards)].append(msg)
        answers = self._exchange(outbox, timeout, changes_memory=bool(trains))
        replies = []
        for i, msg in enumerate(messages):
            if i in cohorts:
                parts = [(part, *_answer(answers[k], _part_id(msg, k)))
                         for k, part in enumerate(cohorts[i])]
                content = (merge_train(parts, self.like)
                           if msg.metadata.message_type == MessageType.TRAIN
                           else merge_evaluate([p[:2] for p in parts],
                                               [int(c) for c in R.cohort_ids(msg)]))
                replies.append(Message(content, reply_to=msg))
                continue
            answer, _ = _answer(answers[shard_of(msg.metadata.dst_node_id - FIRST_CLIENT_NODE,
                                                 self.shards)], msg.metadata.message_id)
            if isinstance(answer, Message):  # readdressed: the shard's grid used ids of its own
                replies.append(Message(answer.error, reply_to=msg) if answer.has_error()
                               else Message(answer.content, reply_to=msg))
            # a dead shard's per-client message gets no reply: the strategy counts it missing
        return replies

    def _exchange(self, outbox: list[list[Message]], timeout: float | None, changes_memory: bool
                  ) -> list[dict[str, tuple[Message, Detached | None]] | BaseException]:
        """Each shard's messages to its actor, all shards at once; per shard its replies by the id
        of the message they answer, or the error that says its actor died."""
        calls = {k: msgs for k, msgs in enumerate(outbox) if msgs}
        answers: list[dict[str, tuple[Message, Detached | None]] | BaseException] = [
            {} for _ in outbox]
        for k, result in self.actors.call("handle", calls, timeout,
                                          within=_patience(calls, timeout, self.actors.timeout)
                                          ).items():
            if isinstance(result, BaseException):
                self._died(k, result)
                answers[k] = result
            else:
                answers[k] = {mid: (reply, arrays) for mid, reply, arrays in result}
                if changes_memory and self.keeps_memory:
                    self._dirty.add(k)
        return answers

    # -- memories and checkpoints ---------------------------------------------------------------
    def memory_state(self) -> dict | None:
        """Every shard's memories as one bank state (the checkpoint's); a FedmamlError when a
        shard's are lost (the previous checkpoint then stays)."""
        self._revive_shards()
        if self._lost:
            raise FedmamlError(self._lost_reason())
        states = self.actors.call("memory_state", {k: () for k in range(self.shards)})
        dead = {k: s for k, s in states.items() if isinstance(s, BaseException)}
        for k, e in dead.items():
            self._died(k, e)
        if dead:
            raise FedmamlError(self._lost_reason() if self._lost else
                               f"shard(s) {sorted(dead)} died while their memories were read")
        self._dirty.clear()
        self._synced = self._round
        return merge_bank_states([states[k] for k in range(self.shards)], self.bank.num_clients)

    def load_memory_state(self, state: dict | None) -> None:
        """Give every shard its rows of ``state`` (a checkpoint's bank, from any number of shards
        or the vectorized engine)."""
        if state is None:
            return
        parts = split_bank_state(state, self.shards)
        failed = {k: e for k, e in self.actors.call(
            "load_memory_state", {k: (parts[k],) for k in range(self.shards)}).items()
            if isinstance(e, BaseException)}
        if failed:
            raise FedmamlError(f"shard(s) {sorted(failed)} could not load their memories: "
                               f"{next(iter(failed.values()))}")
        self._dirty.clear()
        self._synced = "resumed"

    # -- failures -------------------------------------------------------------------------------
    def _note_round(self, server_round: int) -> None:
        if self._synced == "resumed":  # a resumed run's first round follows its checkpoint's
            self._synced = server_round - 1
        self._round = max(self._round, server_round)

    def _died(self, shard: int, error: BaseException) -> None:
        where = self.actors.where.get(shard, {})
        reason = (f"shard {shard}'s Ray actor (pid {where.get('pid', '?')} on "
                  f"{where.get('host', '?')}) "
                  f"{'timed out' if isinstance(error, TimeoutError) else 'died'} in round "
                  f"{self._round}: {type(error).__name__}")
        self.deaths.append({"shard": shard, "round": self._round, "reason": reason})
        self.actors.forget(shard)
        if shard in self._dirty:
            self._lost[shard] = reason
            log.error("%s; its clients' memories since the last checkpoint are lost", reason)
        else:
            self._revive[shard] = reason
            log.warning("%s; starting a new actor for it from the last checkpoint", reason)

    def _revive_shards(self) -> None:
        """A new actor for every shard that died without losing anything, with its memories as the
        last checkpoint holds them (none: it had not trained yet)."""
        if not self._revive:
            return
        state = self._checkpointed_bank() if self.keeps_memory and self._synced is not None \
            else None
        for shard in sorted(self._revive):
            try:
                self.actors.start(shard)
                if state is not None:
                    failed = self.actors.call("load_memory_state", {shard: (state,)})[shard]
                    if isinstance(failed, BaseException):
                        raise failed
            except Exception as e:  # noqa: BLE001 - no actor: then the shard is lost after all
                self.actors.forget(shard)
                self._lost[shard] = f"{self._revive[shard]}; no new actor ({e})"
            del self._revive[shard]
        if self._lost:
            self._stop()

    def _checkpointed_bank(self) -> dict | None:
        """The memory bank of the last checkpoint, read from the run directory (the file must be
        the one the last :meth:`memory_state` went into)."""
        path = None if self.run_dir is None else checkpoint.path_of(self.run_dir)
        if path is None or not path.exists():
            raise FedmamlError(f"no checkpoint at {path} to restore the shard from")
        saved = checkpoint.load(self.run_dir)  # type: ignore[arg-type]
        if saved["round"] != self._synced:
            raise FedmamlError(f"the checkpoint holds round {saved['round']}, not round "
                               f"{self._synced} whose memories the shard had")
        memories = saved["memories"]
        if memories.get("bank") is not None:
            return memories["bank"]
        return checkpoint.clients_to_bank(memories.get("clients", {}), self.bank.num_clients)

    def _lost_reason(self) -> str:
        return "; ".join(self._lost[k] for k in sorted(self._lost))

    def _stop(self) -> None:
        """Stop the run: memories are lost. Resumable from the last checkpoint when there is one."""
        why = self._lost_reason()
        saved = self.run_dir is not None and checkpoint.path_of(self.run_dir).exists()
        if saved:
            raise RunStopped("interrupted", self._round,
                             f"{why}; the memories of its clients since the last checkpoint are "
                             f"lost: resume with {resume_command(self.run_dir, python=False)}")
        raise RunStopped("failed", self._round,
                         f"{why}; the memories of its clients are lost and there is no checkpoint "
                         "to resume from (federated.checkpoint_every > 0 writes them; 1 lets the "
                         "run replace a lost actor and go on)")


#: ``ShardActors.call``'s default bound: ``engine.discovery_timeout``.
SMALL_CALL: Any = object()


def _patience(calls: dict[int, list[Message]], timeout: float | None, grace: float
              ) -> float | None:
    """How long the shards may take to answer their messages (``None``: no bound) under the round's
    ``timeout``: ``timeout`` per client of the busiest shard, since a vmapped client's time is its
    share of its cohort's (a shard answers after the deadline with every client on time), plus
    ``grace`` (``engine.discovery_timeout``) for Ray and a loaded machine. Past that, its clients
    cannot all be on time, and a shard that never answers would hold the run for ever."""
    if timeout is None:
        return None
    clients = max((sum(len(R.cohort_ids(m) or (0,)) for m in msgs) for msgs in calls.values()),
                  default=1)
    return timeout * clients + grace


class ShardActors:
    """The shards' Ray actors: started in a placement group, called together, replaced one by one."""

    def __init__(self, config: Config, num_nodes: int) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.cfg, self.num_nodes = config, num_nodes
        engine = config.engine
        self.shards = engine.shards
        self.timeout = engine.discovery_timeout
        self.options: dict[str, Any] = {"num_cpus": engine.num_cpus, "num_gpus": engine.num_gpus,
                                        "max_restarts": 0}
        self._remote = ray.remote(ShardWorker)
        self.group = None
        self.handles: dict[int, Any] = {}  # before anything can fail: stop() reads it
        self.where: dict[int, dict[str, Any]] = {}
        if engine.placement != "none":
            bundle = {k: v for k, v in (("CPU", engine.num_cpus), ("GPU", engine.num_gpus)) if v}
            self.group = placement_group([dict(bundle) for _ in range(self.shards)],
                                         strategy=engine.placement.upper())
            ready = self.group.ready()
            done, _ = ray.wait([ready], timeout=self.timeout)
            if not done:
                self.stop()
                raise ConfigError(
                    f"engine.shards: the Ray cluster cannot place {self.shards} shard actors of "
                    f"{bundle} ({engine.placement}) within engine.discovery_timeout="
                    f"{self.timeout:g}s; it has {ray.cluster_resources()}. Use fewer shards, smaller "
                    "engine.num_cpus/num_gpus, engine.placement: spread, or more nodes")
        try:
            for k in range(self.shards):
                self.start(k)
        except BaseException:
            self.stop()
            raise

    def start(self, shard: int) -> None:
        """A new actor for ``shard`` (in its bundle of the placement group), once it answers. One
        that dies before it answers (placed on a node that was going away) is replaced, until
        ``engine.discovery_timeout`` has passed."""
        import ray

        options = dict(self.options)
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=shard)
        deadline = time.monotonic() + self.timeout
        while True:
            handle = self._remote.options(**options).remote(self.cfg, self.num_nodes, shard,
                                                            self.shards)
            try:
                self.where[shard] = ray.get(handle.info.remote(),
                                            timeout=max(deadline - time.monotonic(), 0.1))
                break
            except ray.exceptions.GetTimeoutError:
                ray.kill(handle)
                raise FedmamlError(f"shard {shard}'s actor did not start within "
                                   f"engine.discovery_timeout={self.timeout:g}s (no node with "
                                   f"{self.options['num_cpus']} CPU, {self.options['num_gpus']} "
                                   "GPU free?)") from None
            except ray.exceptions.RayActorError as e:
                if getattr(e, "actor_init_failed", False):  # its own error: again would be alike
                    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                    raise FedmamlError(f"shard {shard}'s actor failed as it started: "
                                       f"{lines[-1] if lines else type(e).__name__}") from None
                if time.monotonic() >= deadline:
                    raise FedmamlError(f"shard {shard}'s actor kept dying as it started: "
                                       f"{str(e).splitlines()[0]}") from None
                log.info("shard %d's new actor died before it started (its node going away?); "
                         "trying again", shard)
                time.sleep(RETRY_SECONDS)  # the cluster learns what it lost in the meantime
        self.handles[shard] = handle

    def forget(self, shard: int) -> None:
        self.handles.pop(shard, None)

    def call(self, method: str, args: dict[int, tuple], *more: Any,
             within: Any = SMALL_CALL) -> dict[int, Any]:
        """``method(*args[k], *more)`` on the actor of every shard ``k`` given, all at once; per
        shard its result, or the exception that says its actor is gone. ``within``: seconds to
        wait for all of them (``None``: no bound); by default ``engine.discovery_timeout``, the
        bound of the small calls (stats, memories). A shard that has not answered by then is
        taken for hung: its actor is killed (its bundle of the placement group is then free for a
        new one) and its result is a ``TimeoutError`` saying so, which callers treat as a death."""
        import ray

        within = self.timeout if within is SMALL_CALL else within
        refs = {k: getattr(self.handles[k], method).remote(*(a if isinstance(a, tuple) else (a,)),
                                                            *more)
                for k, a in args.items() if k in self.handles}
        out: dict[int, Any] = {k: ray.exceptions.ActorDiedError()
                               for k in args if k not in self.handles}
        deadline = None if within is None else time.monotonic() + within
        for k, ref in refs.items():
            try:
                out[k] = ray.get(ref, timeout=None if deadline is None
                                 else max(deadline - time.monotonic(), 0.0))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                out[k] = e
            except ray.exceptions.GetTimeoutError:
                try:
                    ray.kill(self.handles[k])
                except Exception:  # noqa: BLE001 - gone already
                    pass
                out[k] = TimeoutError(f"shard {k} gave no answer to {method} within {within:g} s; "
                                      "its actor was stopped")
        return out

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles.values():
            try:
                handle.close.remote()
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.handles = {}
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _part_id(msg: Message, shard: int) -> str:
    """The id of the part of cohort instruction ``msg`` that goes to ``shard``."""
    return f"{msg.metadata.message_id}/{shard}"


def _answer(answers: dict[str, tuple[Message, Detached | None]] | BaseException,
            message_id: str) -> tuple[ShardAnswer, Detached | None]:
    if isinstance(answers, BaseException):
        return answers, None
    return answers.get(message_id) or (RuntimeError("the shard sent no reply"), None)


def memory_warning(shards: int) -> str | None:
    """What to say when ``shards`` local actors may not fit this machine's memory (``None`` when
    they do, or when the system does not tell its memory). A warning, not a refusal: the actors
    share their libraries' pages, so somewhat more than the resident size suggests may fit."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
    if memory <= 0 or shards * ACTOR_BYTES <= memory:
        return None
    return (f"engine.shards: {shards} shard actors on this machine may need about "
            f"{shards * ACTOR_BYTES / 2**30:.0f} GB before any client (each imports torch, Flower "
            f"and Ray: about {ACTOR_BYTES / 2**20:.0f} MB resident), and it has "
            f"{memory / 2**30:.0f} GB; with fewer shards (about "
            f"{max(int(memory // ACTOR_BYTES), 1)}) or engine.ray_address (a cluster) the run "
            "does not risk running out of memory")


def connect(engine: Any) -> ray_session.SessionRecord | None:
    """:func:`~fedmaml.engines.ray_engine.connect` for the shards: a local instance gets CPUs
    enough for every shard (they share the cores), and a warning when their actors may not fit."""
    if engine.ray_address in ("", "local") and (too_many := memory_warning(engine.shards)):
        log.warning("%s", too_many)
    return ray_engine.connect(
        engine, num_cpus=max(os.cpu_count() or 1, math.ceil(engine.shards * engine.num_cpus)))


def run_sharded(server_app: ServerApp, client_app: ClientApp, num_nodes: int, config: Config,
                run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``server_app`` on a :class:`ShardedGrid` (``client_app`` runs inside the shards, built
    from ``config``); return what the shards did (per-shard stats, where they ran, the deaths)."""
    del client_app  # each actor builds its own from the config
    session = connect(config.engine)
    grid = None
    try:
        grid = ShardedGrid(config, num_nodes, run_dir)
        return run_on_grid(server_app, grid)
    finally:
        if grid is not None:
            grid.close()
        ray_engine.stop_ray(session)


def run_on_grid(server_app: ServerApp, grid: ShardedGrid) -> dict[str, Any]:
    """Run ``server_app`` on ``grid`` (Ray connected, the actors started); return what the shards
    did: per shard where it ran and its stats (cohorts, clients, stored memories, peak resident
    set), and every actor that died."""
    run_inprocess(server_app, grid.client_app, grid.num_nodes, grid)
    stats = grid.actors.call("stats", {k: () for k in grid.actors.handles})
    return {"shards": [grid.actors.where.get(k, {}) | (s if isinstance(s, dict) else {})
                       for k, s in sorted(stats.items())],
            "deaths": grid.deaths}
