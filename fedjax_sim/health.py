"""Watching a run's health, round by round, from what each round reports.

Three things go wrong silently in a federated run: every client of a round is excluded
(non-finite updates), so the model stops changing; the server's update jumps by orders of
magnitude (a learning rate far too large); or one client's update is far outside the cohort's
(corrupt or badly scaled data), which a mean lets through. Each is flagged in the round's
record and warned about once; a run that excludes every client several rounds in a row stops
with `DivergedError` instead of running on unchanged.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

# Rounds in a row with every client excluded before a run stops.
MAX_ROUNDS_ALL_EXCLUDED = 3
# A client is an outlier when its log update norm's modified z-score (Iglewicz and Hoaglin:
# 0.6745 (x - median) / MAD) exceeds OUTLIER_Z and its norm is OUTLIER_RATIO x the median's:
# the ratio keeps a cohort of near-identical norms (MAD near 0) from flagging small spreads.
OUTLIER_Z = 3.5
OUTLIER_RATIO = 20.0
# The server update is suspect when its norm exceeds UPDATE_JUMP x the params' scale (their
# norm, but at least that of a unit per parameter) or grows UPDATE_GROWTH x in one round.
UPDATE_JUMP = 100.0
UPDATE_GROWTH = 1000.0


class DivergedError(RuntimeError):
    """Every client's update was non-finite for `MAX_ROUNDS_ALL_EXCLUDED` rounds in a row.

    Attributes:
      result: the run up to the round that stopped it (a `SimulationResult`), where known.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def outliers(norms: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(bool[C], f64[C], median): which clients' update norms are far above the cohort's,
    the modified z-score of each log norm (0 where `usable` is False or the norm is 0), and
    the cohort's median norm.

    The statistics are on log norms: norms spread multiplicatively (a client with ten times
    the steps moves about ten times as far), and a median and MAD ignore the outliers
    themselves. Measured on Synthetic(1,1), (0,0) and FEMNIST cohorts of 30-100 clients, the
    largest natural ratio to the median was 6x; a client with features scaled by 1e4 sent
    6,000x. A finite update whose norm overflows f32 is an outlier beside finite norms.
    """
    norms = np.asarray(norms, np.float64)
    usable = np.asarray(usable, bool)
    ok = usable & np.isfinite(norms) & (norms > 0)
    z = np.zeros(len(norms))
    if ok.sum() < 3:
        return np.zeros(len(norms), bool), z, float("nan")
    logs = np.log(norms[ok])
    median = np.median(logs)
    mad = np.median(np.abs(logs - median))
    with np.errstate(divide="ignore", invalid="ignore"):
        z[ok] = np.where(mad > 0, 0.6745 * (logs - median) / mad,
                         np.where(logs > median, np.inf, 0.0))
    overflow = usable & np.isposinf(norms)
    z[overflow] = np.inf
    flagged = (ok & (z > OUTLIER_Z) & (norms > OUTLIER_RATIO * math.exp(median))) | overflow
    return flagged, z, math.exp(median)


class Monitor:
    """Checks each round's record (see `simulate`), adds "outlier_clients" to it and warns;
    `stuck` is the error to stop the run with once every client has been excluded too many
    rounds in a row (raised by the caller once the record is kept)."""

    def __init__(self, num_params: int, params_norm: float):
        self.unit_scale = math.sqrt(max(num_params, 1))
        self.params_norm = params_norm
        self.last_update_norm = None
        self.all_excluded: list[int] = []
        self.last_good: dict | None = None
        self.warned_clients: set[str] = set()
        self.warned_update = False
        self.stuck: DivergedError | None = None

    def snapshot(self) -> dict:
        """What a checkpoint keeps of the monitor (JSON)."""
        return {"params_norm": self.params_norm, "last_update_norm": self.last_update_norm,
                "all_excluded": self.all_excluded, "last_good": self.last_good and {
                    k: self.last_good[k] for k in ("round", "train_loss")},
                "warned_clients": sorted(self.warned_clients),
                "warned_update": self.warned_update}

    def restore(self, snapshot: dict) -> None:
        self.params_norm, self.last_update_norm = (snapshot["params_norm"],
                                                   snapshot["last_update_norm"])
        self.all_excluded, self.last_good = list(snapshot["all_excluded"]), snapshot["last_good"]
        self.warned_clients = set(snapshot["warned_clients"])
        self.warned_update = snapshot["warned_update"]

    def check(self, record: dict) -> None:
        r = record["round"]
        if record["num_excluded"]:
            warnings.warn(f"round {r}: excluded {record['num_excluded']} client(s) with "
                          f"non-finite updates (or of a norm past float32's range): "
                          f"{record['excluded_clients'][:5]}", stacklevel=3)
        self._check_outliers(record)
        if record["num_included"] == 0 and record["num_excluded"]:
            self.all_excluded.append(r)
            if len(self.all_excluded) >= MAX_ROUNDS_ALL_EXCLUDED:
                self.stuck = DivergedError(self._diverged_message(record))
            return
        self.all_excluded = []
        if record["num_included"]:  # not a round whose clients all had weight 0
            self.last_good = record
            self._check_update(record)

    def _check_outliers(self, record: dict) -> None:
        clients = record["clients"]
        flagged, z, median = outliers(clients["update_norm"], clients["finite"])
        ids = np.asarray(clients["client_id"])
        record["outlier_clients"] = ids[flagged].tolist()
        for i in np.flatnonzero(flagged):
            cid = str(ids[i])
            if cid in self.warned_clients:
                continue
            self.warned_clients.add(cid)
            norm = clients["update_norm"][i]
            warnings.warn(
                f"round {record['round']}: client {cid!r} sent an update of norm {norm:.3g}, "
                f"{norm / median:.3g}x the cohort's median (robust z-score {z[i]:.1f}): check "
                "its data (features on another scale, corrupt values?); it is in the aggregate "
                "(the round's record lists it under outlier_clients)", stacklevel=4)

    def _check_update(self, record: dict) -> None:
        norm, before = record["update_norm"], self.params_norm
        self.params_norm = record["params_norm"]
        last, self.last_update_norm = self.last_update_norm, norm
        scale = max(before, self.unit_scale)
        reason = None
        if norm > UPDATE_JUMP * scale:
            reason = (f"{norm / scale:.3g}x the scale of the params it changes (norm "
                      f"{before:.3g})")
        elif last and norm > UPDATE_GROWTH * last:
            reason = f"{norm / last:.3g}x the previous round's ({last:.3g})"
        if reason and not self.warned_update:
            self.warned_update = True
            warnings.warn(f"round {record['round']}: the server's update has norm {norm:.3g}, "
                          f"{reason}: training is diverging. Is a learning rate too large?",
                          stacklevel=4)

    def _diverged_message(self, record: dict) -> str:
        rounds = self.all_excluded
        since = (f"the server params have not changed since round {self.last_good['round']}, "
                 f"whose training loss was {self.last_good['train_loss']:.3g}"
                 if self.last_good else "the server params have not changed since the start")
        return (f"every client's update was non-finite in rounds {rounds[0]}-{rounds[-1]} "
                f"({len(rounds)} rounds in a row), so {since} (params norm "
                f"{record['params_norm']:.3g}). Likely causes: learning rates too large for the "
                "model (updates overflow), extreme values in the data, or params the model "
                "cannot use; lower the learning rates or check the data. The run so far is in "
                "this error's .result")
