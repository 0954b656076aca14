"""The meta-strategy: Flower's ``FedAvg`` message plumbing around fedmeta's server step.

Training rounds go to the seeded selection of *training* clients
(:func:`fedmeta.runtime.server.select_clients`, the same draw as the in-process loop; held-out
new clients never train), evaluation goes to every client. Replies are decoded, checked by
fedmeta (an error reply, a reply from the wrong client, NaN/Inf or wrongly shaped arrays are
dropped with a warning and counted -- Flower's ``FedAvg`` would propagate NaN or abort the
run on inconsistent replies) and aggregated by :class:`MetaServer`: the task-weighted mean
pseudo-gradient ``global - local`` goes through the configured server optimiser.

Central (client-level) DP puts one of Flower's four DP wrappers *inside* this strategy,
between validation and the server optimiser, wrapping a plain ``FedAvg`` transport:

  validate -> clip (wrapper or client mod) -> uniform mean -> Gaussian noise (wrapper)
           -> server optimiser on ``global - noisy mean`` (MetaServer's optimiser)

rather than wrapping this strategy from outside, because (1) the wrapper adds noise to
whatever the inner strategy returns, and the output of an Adam step or of SGD with a server
rate != 1 does not have the sensitivity the noise is calibrated for -- the optimiser must
act on the noisy mean (post-processing); (2) the wrapper skips the whole round on a single
error reply, before our validation could drop it; (3) with an unmodified
``FedAvg.aggregate_train`` inside, Flower's own privacy accountant is allowed
(fixed clipping). Under central DP every client weighs the same: the noise std
``sigma * C / n`` assumes a uniform mean, a task-weighted one would let a large client move
the aggregate by more than ``C / n``. Adaptive clipping wrappers take no accountant, so
their epsilon comes from the same ``RdpAccountant`` class composed here.

Flower's DP noise comes from numpy's global generator; it is seeded from (seed, round) for
the call and restored afterwards, so a resumed run adds the noise an uninterrupted one
did. That suits a simulator; a real deployment must not derive noise from a known seed.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import (GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig,
                            RdpAccountant, SamplingMethod)
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg)

from fedmeta.algorithms.base import ClientUpdate
from fedmeta.config import CentralDPConfig, ConfigError, ExperimentConfig
from fedmeta.privacy.local import charge_unconfirmed_round
from fedmeta.runtime.server import MetaServer, RoundOutcome, check_update, select_clients
from server.codec import ARRAYS, CONFIG, METRICS, WEIGHT, CodecError, \
    array_record_nbytes, content_client_id, content_to_update, encode_state, from_array_record, \
    records_to_rows, to_array_record

log = logging.getLogger(__name__)

OVERRIDES, EXPECTED = "fedmeta.overrides", "fedmeta.client-id"
STATE, STATE_ROUND, CLIPPING = "fedmeta.state", "fedmeta.state-round", "fedmeta.clipping"
NORM_BIT = "norm_bit"


@dataclass
class ClientInfo:
    client_id: str
    domain: str
    new_client: bool
    order: int                      # position in the federation's client list


@dataclass
class Directory:
    """Which node serves which fedmeta client (learned from the nodes themselves)."""

    clients: dict[str, ClientInfo] = field(default_factory=dict)
    node_of: dict[str, int] = field(default_factory=dict)
    num_clients: int | None = None

    def client_of(self, node_id: int) -> str | None:
        for cid, node in self.node_of.items():
            if node == node_id:
                return cid
        return None

    @property
    def complete(self) -> bool:
        return self.num_clients is not None and len(self.node_of) == self.num_clients

    def ordered(self) -> list[ClientInfo]:
        return sorted(self.clients.values(), key=lambda c: c.order)

    @property
    def training_ids(self) -> list[str]:
        return [c.client_id for c in self.ordered() if not c.new_client]


@dataclass
class RoundLog:
    """What one round did, for metrics.csv / summary.json and the progress line."""

    train: dict[str, tuple[str, dict]] = field(default_factory=dict)   # cid -> (domain, metrics)
    outcome: RoundOutcome | None = None
    failures: dict[str, str] = field(default_factory=dict)
    eval_rows: list[dict] = field(default_factory=list)
    eval_failures: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_sent_eval: int = 0
    bytes_received: int = 0
    sampled: list[str] = field(default_factory=list)
    central: dict | None = None


@contextmanager
def seeded_numpy(seed: int):
    saved = np.random.get_state()
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        np.random.set_state(saved)


class _Transport(FedAvg):
    """The plain FedAvg a DP wrapper wraps: it only addresses the nodes chosen upstream."""

    def __init__(self):
        super().__init__(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
        self.planned: list[tuple[int, ConfigRecord]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return [Message(RecordDict({self.arrayrecord_key: arrays,
                                    self.configrecord_key: ConfigRecord({**config, **own})}),
                        dst_node_id=node, message_type=MessageType.TRAIN)
                for node, own in self.planned]


class CentralDP:
    """Clip + noise through Flower's wrapper; epsilon from Flower's RDP accountant."""

    def __init__(self, dp: CentralDPConfig, num_sampled: int, population: int,
                 released_rounds: list[dict] | None = None):
        self.dp, self.num_sampled, self.population = dp, num_sampled, population
        self.transport = _Transport()
        self.accountant = self._new_accountant()
        for past in released_rounds or []:      # resume: replay what was released
            if past.get("released") and dp.noise_multiplier > 0:
                self.accountant.compose(self._event())
        fixed = dp.clipping == "fixed"
        # Flower's wrapper keeps the accountant itself when its constraints hold
        self.in_wrapper = fixed and dp.noise_multiplier > 0
        if fixed:
            cls = (DifferentialPrivacyServerSideFixedClipping if dp.side == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
            self.wrapper = cls(self.transport, dp.noise_multiplier, dp.clipping_norm, num_sampled,
                               accountant=self.accountant if self.in_wrapper else None)
        else:
            cls = (DifferentialPrivacyServerSideAdaptiveClipping if dp.side == "server"
                   else DifferentialPrivacyClientSideAdaptiveClipping)
            try:
                self.wrapper = cls(self.transport, dp.noise_multiplier, num_sampled,
                                   initial_clipping_norm=dp.clipping_norm)
            except ValueError as err:   # Flower's split of the noise between update and count
                raise ConfigError(f"privacy.central.noise_multiplier: {dp.noise_multiplier} is too "
                                  f"large for adaptive clipping with {num_sampled} sampled clients "
                                  f"(needs < {num_sampled / 10:g}; Flower: {err})") from err
            if released_rounds:
                self.wrapper.clipping_norm = float(released_rounds[-1]["clipping_norm"])

    def _new_accountant(self) -> RdpAccountant:
        # Selection is drawn from the (public) seed, so no sampling amplification is claimed.
        return RdpAccountant(PrivacyConfig(target_delta=self.dp.delta,
                                           population_size=self.population,
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.dp.noise_multiplier,
                                    sample_size=self.num_sampled, population_size=self.population)

    @property
    def epsilon(self) -> float:
        if self.dp.noise_multiplier <= 0:
            return math.inf
        return float(self.accountant.get_privacy_spent().epsilon)

    def epsilon_after(self, releases: int) -> float:
        """Epsilon of a client that took part in ``releases`` released rounds."""
        if releases == 0:
            return 0.0
        if self.dp.noise_multiplier <= 0:
            return math.inf
        acc = self._new_accountant()
        acc.compose(self._event(), count=releases)
        return float(acc.get_privacy_spent().epsilon)

    def configure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  planned: list[tuple[int, ConfigRecord]], grid: Grid) -> list[Message]:
        self.transport.planned = planned
        if self.dp.side == "client":
            config[CLIPPING] = self.dp.clipping
        return list(self.wrapper.configure_train(server_round, arrays, config, grid))

    def aggregate(self, server_round: int, replies: list[Message], seed: int) -> ArrayRecord | None:
        with seeded_numpy(zlib.crc32(f"{seed}/central-dp/{server_round}".encode())):
            arrays, _ = self.wrapper.aggregate_train(server_round, replies)
        if arrays is not None and self.dp.noise_multiplier > 0 and not self.in_wrapper:
            self.accountant.compose(self._event())
        return arrays


class MetaStrategy(FedAvg):
    """Seeded selection of training clients, fedmeta's reply checks and server step."""

    def __init__(self, cfg: ExperimentConfig, overrides: list[str], server: MetaServer,
                 directory: Directory, client_states: dict[str, dict] | None = None,
                 state_rounds: dict[str, int] | None = None, central_history: list[dict] | None = None,
                 node_hints: dict[str, str] | None = None):
        """``node_hints``: extra config every client message carries (the run key naming a
        node's state sub-directory, and in simulation a directory to keep it in)."""
        super().__init__(fraction_train=cfg.runtime.fraction_train, min_train_nodes=1,
                         min_evaluate_nodes=1, min_available_nodes=1)
        self.cfg, self.server, self.directory = cfg, server, directory
        self.overrides_json = json.dumps(list(overrides))
        self.node_hints = dict(node_hints or {})
        self.states = dict(client_states or {})
        self.state_rounds = dict(state_rounds or {})
        self.log = RoundLog()
        population = len(directory.training_ids)
        self.num_sampled = len(select_clients(directory.training_ids, cfg.runtime.fraction_train,
                                              cfg.seed, 1))
        self.central = (CentralDP(cfg.privacy.central, self.num_sampled, population, central_history)
                        if cfg.privacy.central.enabled else None)

    # ---- helpers ---------------------------------------------------------------------------
    def _base_config(self, server_round: int, cid: str) -> dict:
        return {"server-round": server_round, OVERRIDES: self.overrides_json, EXPECTED: cid,
                **self.node_hints}

    def _reply_client(self, msg: Message) -> str | None:
        return self.directory.client_of(msg.metadata.src_node_id)

    # ---- training ----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.log = RoundLog()
        self._global = from_array_record(arrays)
        selected = select_clients(self.directory.training_ids, self.cfg.runtime.fraction_train,
                                  self.cfg.seed, server_round)
        self.log.sampled = selected
        planned = []
        for cid in selected:
            own = self._base_config(server_round, cid)
            own[STATE] = encode_state(self.states.get(cid))
            own[STATE_ROUND] = int(self.state_rounds.get(cid, -1))
            planned.append((self.directory.node_of[cid], ConfigRecord(own)))
        if self.central is not None:
            msgs = self.central.configure(server_round, arrays, config, planned, grid)
        else:
            msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**config, **own})}),
                            dst_node_id=node, message_type=MessageType.TRAIN)
                    for node, own in planned]
        self.log.bytes_sent = array_record_nbytes(arrays) * len(msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results: dict[str, ClientUpdate | Exception] = {}
        kept: dict[str, Message] = {}
        for msg in replies:
            cid = self._reply_client(msg)
            if cid is None:
                log.warning("ignoring a reply from unknown node %s", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                results[cid] = RuntimeError(f"error reply: {msg.error.reason}")
                continue
            self.log.bytes_received += sum(array_record_nbytes(r) for r in
                                           msg.content.array_records.values())
            try:
                claimed = content_client_id(msg.content)
                if claimed != cid:
                    raise CodecError(f"node of client {cid!r} replied as {claimed!r}")
                _, update, state = content_to_update(msg.content, self._global)
            except (CodecError, KeyError, TypeError, ValueError) as err:
                results[cid] = err
                continue
            results[cid] = update
            self.states[cid], self.state_rounds[cid] = state, server_round
            self.log.train[cid] = (self.directory.clients[cid].domain, update.metrics)
            kept[cid] = msg
        for cid in self.log.sampled:
            if cid not in results:
                results[cid] = TimeoutError("no reply within runtime.timeout")
        if self.cfg.privacy.local.enabled:
            for cid, res in results.items():
                if isinstance(res, Exception):   # it may have spent budget all the same
                    self.states[cid] = charge_unconfirmed_round(self.states.get(cid),
                                                                self.cfg.algorithm.local_steps)
                    self.state_rounds[cid] = server_round
        outcome = (self.server.aggregate(results) if self.central is None
                   else self._aggregate_private(server_round, results, kept))
        self.log.outcome = outcome
        self.log.failures = outcome.failures
        return to_array_record(outcome.params), MetricRecord({"accepted": len(outcome.accepted),
                                                              "failures": len(outcome.failures)})

    def _aggregate_private(self, server_round: int, results: dict, kept: dict[str, Message]
                           ) -> RoundOutcome:
        failures, good, valid = {}, [], 0
        for cid, res in sorted(results.items()):
            why = (f"{type(res).__name__}: {res}" if isinstance(res, Exception)
                   else check_update(res, self.server.optimizer.params))
            if why is not None:
                failures[cid] = why
                log.warning("dropping client %s from this round: %s", cid, why)
                continue
            valid += 1
            if res.num_tasks > 0:
                good.append(cid)
        if valid < self.cfg.runtime.min_clients:
            raise RuntimeError(f"only {valid} valid replies, runtime.min_clients="
                               f"{self.cfg.runtime.min_clients}; failures: {failures}")
        uniform = []
        for cid in good:            # equal weights: the noise is calibrated for a uniform mean
            msg = kept[cid]
            metrics = {WEIGHT: 1}
            if NORM_BIT in msg.content[METRICS]:
                metrics[NORM_BIT] = msg.content[METRICS][NORM_BIT]
            msg.content = RecordDict({ARRAYS: msg.content[ARRAYS], METRICS: MetricRecord(metrics)})
            uniform.append(msg)
        noisy = self.central.aggregate(server_round, uniform, self.cfg.seed) if uniform else None
        released = noisy is not None
        if released:
            mean_local = from_array_record(noisy)
            pseudo = {k: self._global[k] - mean_local[k].to(self._global[k].dtype)
                      for k in self._global}
            self.server.optimizer.step([ClientUpdate(pseudo, 1)])
        else:
            log.warning("round %d: the DP wrapper released no aggregate; parameters unchanged",
                        server_round)
        self.log.central = {"released": released, "epsilon": self.central.epsilon,
                            "clipping_norm": float(self.central.wrapper.clipping_norm),
                            "noise_multiplier": self.central.dp.noise_multiplier,
                            "participants": good if released else []}
        return RoundOutcome(self.server.params, good if released else [], failures)

    # ---- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(
                    {**config, **self._base_config(server_round, c.client_id)})}),
                    dst_node_id=self.directory.node_of[c.client_id],
                    message_type=MessageType.EVALUATE)
                for c in self.directory.ordered()]
        self.log.bytes_sent_eval = array_record_nbytes(arrays) * len(msgs)
        self._eval_sent = [c.client_id for c in self.directory.ordered()]
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows: dict[str, list[dict]] = {}
        for msg in replies:
            cid = self._reply_client(msg)
            if cid is None:
                continue
            if msg.has_error():
                self.log.eval_failures[cid] = f"error reply: {msg.error.reason}"
                continue
            try:
                if content_client_id(msg.content) != cid:
                    raise CodecError(f"node of client {cid!r} replied as another client")
                rows[cid] = records_to_rows(msg.content)
            except (CodecError, KeyError, TypeError, ValueError) as err:
                self.log.eval_failures[cid] = str(err)
        for cid in self._eval_sent:
            if cid not in rows and cid not in self.log.eval_failures:
                self.log.eval_failures[cid] = "no reply within runtime.timeout"
        for cid, why in self.log.eval_failures.items():
            log.warning("evaluation of client %s failed in round %d: %s", cid, server_round, why)
        for c in self.directory.ordered():      # federation order, like the in-process loop
            self.log.eval_rows.extend(rows.get(c.client_id, []))
        return MetricRecord({"clients": len(rows), "failures": len(self.log.eval_failures)})

    def summary(self) -> None:
        log.info("MetaStrategy: %d training clients, %d per round, server optimiser %s (lr %g)%s",
                 len(self.directory.training_ids), self.num_sampled,
                 self.cfg.algorithm.server_optimizer, self.cfg.algorithm.server_lr,
                 f", central DP {self.central.wrapper!r}" if self.central else "")


def participation(rounds_info: list[dict]) -> dict[str, int]:
    """Released rounds each client contributed to (for per-client central epsilon)."""
    counts: dict[str, int] = {}
    for r in rounds_info:
        for cid in (r.get("central_dp") or {}).get("participants", []):
            counts[cid] = counts.get(cid, 0) + 1
    return counts
