"""Device heterogeneity, availability and the virtual clock of a simulated federation.

A client's time in a round is download + local steps x step time + upload, each from its own
profile: `Devices.client_times`. The profiles are host-side numpy arrays indexed by population
position, drawn from distributions (`Devices.sample`), read from a CSV (`Devices.from_csv`) or
from FedScale's device-capacity pickle (`Devices.from_fedscale`). `Availability` says which
clients can be sampled at a virtual time (`diurnal`, `fedscale_availability`).

`DeviceModel` is a round's policy: a deadline (late clients dropped, or with `keep_partial`
the local steps that fit kept, FedProx's partial work), over-selection (sample more, keep the
first to finish), random dropouts and availability. `Simulation(devices=...)` applies it on
the host before packing (`DeviceModel.plan`): the clients that do not report become padding
and a cut-off client gets a step budget, so the compiled round is the same program whatever
happens (no recompile), and the virtual clock advances by the round's closing time.

Nothing here runs in the compiled round. `Batching.straggler_fraction`/`drop_stragglers` stay
the simpler model of FedProx's experiments (a random fraction of clients running fewer
epochs, with no clock); the device model derives who is slow from the profiles instead, and
the two compose (a straggler's fewer epochs shorten its planned time).

References:
  Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx: partial work).
  Bonawitz et al. 2019, "Towards Federated Learning at Scale: System Design" (over-selection
  by 130%, a reporting deadline, diurnal availability).
  Lai et al. 2022, "FedScale: Benchmarking Model and System Performance of Federated
  Learning at Scale" (device-capacity and client-behaviour traces).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import pickle
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from fedjax_sim.data.cohort import _unit

# Counter-based draws of this module (`cohort._unit` salts 1 and 2 are the stragglers').
_DROPOUT_SALT = 3


@dataclasses.dataclass(frozen=True)
class Devices:
    """Per-client device profiles, indexed by population position.

    Attributes:
      example_time: f64[N], seconds of compute per training example (forward and backward),
        so a local step of batch B takes `B * example_time`.
      download_rate: f64[N], downlink bytes per second.
      upload_rate: f64[N], uplink bytes per second.
    """

    example_time: np.ndarray
    download_rate: np.ndarray
    upload_rate: np.ndarray

    def __post_init__(self):
        sizes = set()
        for name in ("example_time", "download_rate", "upload_rate"):
            value = np.asarray(getattr(self, name), np.float64)
            if value.ndim != 1:
                raise ValueError(f"Devices.{name} must be one value per client (1-D), got "
                                 f"shape {value.shape}")
            bad = ~np.isfinite(value) | (value <= 0 if name != "example_time" else value < 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"Devices.{name} must be finite and "
                                 f"{'>= 0' if name == 'example_time' else '> 0'} for every "
                                 f"client; client {i} has {value[i]!r}")
            object.__setattr__(self, name, value)
            sizes.add(len(value))
        if len(sizes) != 1:
            raise ValueError(f"Devices' arrays must have one length (one entry per client), got "
                             f"{sorted(sizes)}")

    @property
    def num_clients(self) -> int:
        return len(self.example_time)

    def fingerprint(self) -> str:
        """A short hash of the profiles (a resumed run must use the same ones)."""
        h = hashlib.sha256()
        for a in (self.example_time, self.download_rate, self.upload_rate):
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def sample(cls, num_clients: int, seed: int, *, example_time: float = 5e-3,
               download_rate: float = 2.5e6, upload_rate: float = 6.25e5,
               sigma_compute: float = 0.5, sigma_network: float = 1.0) -> Devices:
        """Profiles drawn independently per client from log-normal distributions.

        Each argument is a median; `sigma_*` is the standard deviation of its logarithm (the
        spread: at 1.0 the 95th percentile is 5.2x the median and the 5th-95th percentile
        range 27x; at 0.5, 2.3x and 5.2x). The defaults
        are a phone-class population, plausible rather than measured here:
        - compute: 5 ms per training example (forward and backward), a small CNN on a
          mid-range phone; the AI Benchmark measurements behind FedScale's device profiles
          (Ignatov et al. 2019) span about 5x between phones of one generation, hence 0.5.
          Scale it to your model: per-example time grows with its FLOPs.
        - network: 20 Mbit/s down (2.5e6 B/s), 5 Mbit/s up (6.25e5 B/s), between the
          MobiPerf measurements of FedScale's traces and Ookla's 2023-24 global mobile
          medians (about 50 and 11 Mbit/s); mobile links vary over an order of magnitude,
          hence 1.0.
        Seeded by `seed` alone, so a population keeps its devices whatever the run does.
        """
        num_clients = _check_count("num_clients", num_clients)
        for name, value in (("example_time", example_time), ("download_rate", download_rate),
                            ("upload_rate", upload_rate)):
            if not _is_number(value) or not value > 0:
                raise ValueError(f"Devices.sample: {name} (a median) must be a finite number "
                                 f"> 0, got {value!r}")
        for name, value in (("sigma_compute", sigma_compute), ("sigma_network", sigma_network)):
            if not _is_number(value) or value < 0:
                raise ValueError(f"Devices.sample: {name} must be a finite number >= 0, got "
                                 f"{value!r}")
        rng = np.random.default_rng([seed, 7])
        draw = lambda median, sigma: median * np.exp(sigma * rng.standard_normal(num_clients))
        return cls(draw(example_time, sigma_compute), draw(download_rate, sigma_network),
                   draw(upload_rate, sigma_network))

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> Devices:
        """Profiles from a CSV with a header and one row per client:

            client,example_time_s,download_Bps,upload_Bps
            0,0.004,2500000,625000

        `client` is the population position (0 .. N-1, each once, any order); the others are
        seconds per training example and bytes per second down and up. A missing column, a
        value that is not a number, a negative or non-finite one, or a missing or repeated
        client is an error naming the row and column.
        """
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{os.fspath(path)}: missing column(s) {missing} (a device "
                                 f"CSV has the header {','.join(CSV_COLUMNS)}; found "
                                 f"{header})")
            rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
        if not rows:
            raise ValueError(f"{os.fspath(path)}: no rows after the header")
        values = {c: np.empty(len(rows)) for c in CSV_COLUMNS}
        for i, row in enumerate(rows):
            for c in CSV_COLUMNS:
                text = (row.get(c) or "").strip()
                try:
                    v = float(text)
                except ValueError:
                    raise ValueError(f"{os.fspath(path)}: row {i + 2}, column {c!r}: "
                                     f"{text!r} is not a number") from None
                positive = c not in ("client", "example_time_s")
                if not math.isfinite(v) or v < 0 or (positive and v == 0):
                    raise ValueError(f"{os.fspath(path)}: row {i + 2}, column {c!r}: {text} "
                                     f"must be finite and {'> 0' if positive else '>= 0'}")
                values[c][i] = v
        clients = values["client"]
        if np.any(clients != np.round(clients)):
            i = int(np.flatnonzero(clients != np.round(clients))[0])
            raise ValueError(f"{os.fspath(path)}: row {i + 2}, column 'client': "
                             f"{clients[i]!r} is not a population position (an integer)")
        clients = clients.astype(np.int64)
        counts = np.bincount(clients, minlength=len(rows))
        if len(counts) > len(rows) or np.any(counts != 1):
            repeated = np.flatnonzero(counts > 1)
            absent = np.flatnonzero(counts[:len(rows)] == 0)
            raise ValueError(f"{os.fspath(path)}: column 'client' must list 0 .. "
                             f"{len(rows) - 1} once each; "
                             + (f"repeated: {repeated[:5].tolist()}" if len(repeated)
                                else f"missing: {absent[:5].tolist()}"))
        by = np.argsort(clients)
        return cls(values["example_time_s"][by], values["download_Bps"][by],
                   values["upload_Bps"][by])

    @classmethod
    def from_fedscale(cls, path: str | os.PathLike, num_clients: int, seed: int = 0, *,
                      augmentation_factor: float = 3.0) -> Devices:
        """Profiles from FedScale's device-capacity pickle, `{id: {"computation": c,
        "communication": b}}` (its `client_device_capacity` file).

        FedScale times a client's compute as `augmentation_factor x batch x steps x c / 1000`
        seconds (so `c` is milliseconds per example forward, and the factor 3 counts the
        backward pass) and its transfers as `size / b` with the size in kbit (bytes x 8 /
        1024) and `b` in kbit/s, the same for both directions (`Client.getCompletionTime`,
        `fedscale/cloud/internal/client_metadata.py`). Here that is `example_time =
        augmentation_factor x c / 1000` and both rates `b x 1024 / 8` bytes/s, so a client's
        time is FedScale's.

        The trace's profiles are dealt to the `num_clients` clients in a seeded order,
        cycling when the population is larger (each profile then serves
        `num_clients / len(trace)` clients, give or take one), as FedScale maps its clients
        onto the trace modulo its length.
        """
        num_clients = _check_count("num_clients", num_clients)
        trace = _load_pickle(path)
        compute, link = np.empty(len(trace)), np.empty(len(trace))
        for i, key in enumerate(sorted(trace, key=str)):
            entry = trace[key]
            for name, out in (("computation", compute), ("communication", link)):
                value = entry.get(name) if isinstance(entry, dict) else None
                if not _is_number(value) or not value > 0:
                    raise ValueError(f"{os.fspath(path)}: client {key!r} needs a finite "
                                     f"{name!r} > 0 (FedScale's device-capacity format: "
                                     f"{{id: {{'computation': ms, 'communication': kbps}}}}), "
                                     f"got {value!r}")
                out[i] = value
        who = _deal(len(trace), num_clients, seed)
        rate = link[who] * 1024 / 8
        return cls(augmentation_factor * compute[who] / 1000, rate, rate.copy())

    @classmethod
    def constant(cls, num_clients: int, *, example_time: float, download_rate: float,
                 upload_rate: float) -> Devices:
        """Every client with the same profile."""
        full = lambda v: np.full(num_clients, v, np.float64)
        return cls(full(example_time), full(download_rate), full(upload_rate))

    def client_times(self, ids: np.ndarray, num_steps: np.ndarray, batch_size: int,
                     download_bytes: float, upload_bytes: float | np.ndarray) -> np.ndarray:
        """Seconds each client `ids` takes: download, `num_steps` local steps of
        `batch_size` examples, upload (`upload_bytes` per client or one for all)."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_clients):
            raise ValueError(f"client ids must be in [0, {self.num_clients}) (the profiled "
                             f"population), got {ids.min()}..{ids.max()}")
        steps = np.asarray(num_steps, np.float64)
        return (download_bytes / self.download_rate[ids]
                + steps * batch_size * self.example_time[ids]
                + np.asarray(upload_bytes, np.float64) / self.upload_rate[ids])


CSV_COLUMNS = ("client", "example_time_s", "download_Bps", "upload_Bps")


def _is_number(value) -> bool:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool) and math.isfinite(value))


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _load_pickle(path: str | os.PathLike) -> dict:
    with open(path, "rb") as f:
        trace = pickle.load(f)  # noqa: S301 (a trace file the user names, as FedScale reads it)
    if not isinstance(trace, dict) or not trace:
        raise ValueError(f"{os.fspath(path)}: a FedScale trace is a non-empty dict keyed by "
                         f"client id, got {type(trace).__name__}")
    return trace


def _deal(num_profiles: int, num_clients: int, seed: int) -> np.ndarray:
    """Which profile each client gets: seeded permutations of the profiles, one after
    another, cut at `num_clients` (no profile used twice before every one is used once)."""
    rng = np.random.default_rng([seed, 8])
    rounds = -(-num_clients // num_profiles)
    return np.concatenate([rng.permutation(num_profiles) for _ in range(rounds)])[:num_clients]


class Availability(NamedTuple):
    """Which clients can be sampled at a virtual time.

    Attributes:
      available: `(ids i64[n], t seconds) -> bool[n]`.
      num_clients: the population it covers.
      name: e.g. "diurnal(period=86400, fraction=0.5)", for the run's fingerprint.
    """

    available: Callable[[np.ndarray, float], np.ndarray]
    num_clients: int
    name: str

    def __call__(self, ids: np.ndarray | None, t: float) -> np.ndarray:
        """bool mask of the clients `ids` (None: all) available at virtual time `t`."""
        ids = np.arange(self.num_clients) if ids is None else np.asarray(ids, np.int64)
        return np.asarray(self.available(ids, float(t)), bool)


def diurnal(num_clients: int, seed: int = 0, *, period: float = 86400.0,
            fraction: float | np.ndarray = 0.5) -> Availability:
    """Client c is available while `sin(2 pi t / period + phase_c) > cos(pi fraction_c)`, its
    phase uniform in [0, 2 pi) (seeded): each client is available for its `fraction` (one
    for all, or one per client) of every period, in one stretch, and at any time about the
    mean fraction of the population is (the day-night cycle of phones idle, charging and on
    Wi-Fi, Bonawitz et al. 2019, fig. 6)."""
    num_clients = _check_count("num_clients", num_clients)
    if not _is_number(period) or not period > 0:
        raise ValueError(f"diurnal: period must be a finite number of seconds > 0, got "
                         f"{period!r}")
    frac = np.broadcast_to(np.asarray(fraction, np.float64), (num_clients,)) \
        if np.ndim(fraction) == 0 or np.shape(fraction) == (num_clients,) else None
    if frac is None or not np.all(np.isfinite(frac) & (frac > 0) & (frac <= 1)):
        raise ValueError(f"diurnal: fraction must be in (0, 1], one number or one per client "
                         f"({num_clients}), got {np.asarray(fraction).tolist()!r}"[:300])
    phase = np.random.default_rng([seed, 9]).uniform(0, 2 * np.pi, num_clients)
    threshold = np.cos(np.pi * frac)
    always = frac == 1  # sin > cos(pi) = -1 misses one instant a period

    def available(ids, t):
        return always[ids] | (np.sin(2 * np.pi * t / period + phase[ids]) > threshold[ids])

    digest = hashlib.sha256(frac.tobytes()).hexdigest()[:8]
    return Availability(available, num_clients,
                        f"diurnal(seed={seed}, period={period:g}, fraction {digest})")


def fedscale_availability(path: str | os.PathLike, num_clients: int,
                          seed: int = 0) -> Availability:
    """Availability from FedScale's client-behaviour trace, `{id: {"active": [s, ...],
    "inactive": [s, ...], "finish_time": s, ...}}`: a client is available while
    `active[i] <= t mod finish_time <= inactive[i]` for some i (FedScale's
    `Client.isActive`, without its stateful index). Trace entries are dealt to clients in a
    seeded order, cycling, as `Devices.from_fedscale` deals profiles."""
    num_clients = _check_count("num_clients", num_clients)
    trace = _load_pickle(path)
    starts, ends, owner, period = [], [], [], np.empty(len(trace))
    for i, key in enumerate(sorted(trace, key=str)):
        entry = trace[key]
        if not isinstance(entry, dict) or any(k not in entry for k in
                                              ("active", "inactive", "finish_time")):
            raise ValueError(f"{os.fspath(path)}: client {key!r} needs 'active', 'inactive' "
                             "and 'finish_time' (FedScale's client-behaviour format)")
        a = np.asarray(entry["active"], np.float64).reshape(-1)
        b = np.asarray(entry["inactive"], np.float64).reshape(-1)
        finish = entry["finish_time"]
        if (len(a) != len(b) or not np.all(np.isfinite(a) & np.isfinite(b)) or np.any(a < 0)
                or np.any(b < a) or not _is_number(finish) or not finish > 0):
            raise ValueError(f"{os.fspath(path)}: client {key!r}: 'active' and 'inactive' "
                             "must be equally long lists of finite times >= 0 with each "
                             "inactive >= its active, and 'finish_time' a number > 0")
        starts.append(a)
        ends.append(b)
        owner.append(np.full(len(a), i))
        period[i] = finish
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    count = np.bincount(np.concatenate(owner), minlength=len(trace))
    first = np.cumsum(count) - count
    who = _deal(len(trace), num_clients, seed)

    def available(ids, t):
        profile = who[ids]
        tau = np.mod(t, period[profile])
        n = count[profile]
        lane = np.repeat(np.arange(len(ids)), n)  # every interval of every asked client
        k = np.repeat(first[profile] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        hit = (starts[k] <= tau[lane]) & (tau[lane] <= ends[k])
        return np.bincount(lane, weights=hit, minlength=len(ids)) > 0

    digest = hashlib.sha256(starts.tobytes() + ends.tobytes()).hexdigest()[:12]
    return Availability(available, num_clients, f"fedscale({len(trace)} traces {digest}, "
                                                f"seed={seed})")


class RoundPlan(NamedTuple):
    """What the device model decided for one round, on the host, before packing.

    Attributes:
      ids: i64[k], the clients that report (they train and count), in sample order.
      max_steps: i64[k], their local-step budgets: the planned steps, or for a client cut off
        by the deadline with `keep_partial` the steps that fit before it.
      client_time: f64[k], seconds from the round's start to each one's report.
      start: the virtual clock at the round's start (seconds).
      round_time: seconds until the server closes the round (`DeviceModel.plan`).
      num_sampled: clients drawn (over-selected ones included).
      num_dropped: drawn clients that dropped out (never report).
      num_late: clients whose full work would end past the deadline (some of them may
        report partial work: `num_partial`).
      num_partial: late clients that report the steps that fit (`keep_partial`).
      num_unselected: clients that finished in time but after the first `target` (over-
        selection): not counted.
      num_available: clients available at the round's start (the population without an
        availability model).
    """

    ids: np.ndarray
    max_steps: np.ndarray
    client_time: np.ndarray
    start: float
    round_time: float
    num_sampled: int
    num_dropped: int
    num_late: int
    num_partial: int
    num_unselected: int
    num_available: int

    @property
    def end(self) -> float:
        return self.start + self.round_time


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """A round's device policy: who reports, with how many local steps, and when the server
    closes the round on the virtual clock. `Simulation(devices=DeviceModel(...))` applies it.

    Attributes:
      devices: the population's profiles (one per client).
      deadline: seconds from a round's start; a client whose download, local steps and upload
        end later is late. None: no deadline (the server waits for every client that did not
        drop out).
      over_selection: draw `ceil(over_selection x cohort_size)` clients (uniformly among
        those available) and count the first `cohort_size` to report; 1.3 is Bonawitz et
        al.'s 130%. The round compiles for the larger draw.
      dropout: each drawn client's chance of never reporting, seeded by (seed, round, client
        id) (a lost connection: the server learns of it at once).
      availability: `diurnal(...)` or `fedscale_availability(...)`: the cohort is drawn among
        the clients available at the round's start (virtual clock); None: always available.
        Needs a deadline (a round with nobody available lasts it, and the clock moves on).
      keep_partial: a late client reports the local steps that fit before the deadline,
        `floor((deadline - download - upload) / step time)` (FedProx's partial work,
        Li et al. 2020); one that fits no step does not report. False: late clients are
        dropped (FedAvg's rule there).

    The round closes at the last counted client's report when `cohort_size` clients were
    counted (with over-selection: the cohort_size-th to report), otherwise at the deadline
    when there is one (the server waited for clients that never came), else at the last
    counted report (0 when nobody reports).
    """

    devices: Devices
    deadline: float | None = None
    over_selection: float = 1.0
    dropout: float = 0.0
    availability: Availability | None = None
    keep_partial: bool = False

    def __post_init__(self):
        if not isinstance(self.devices, Devices):
            raise TypeError(f"DeviceModel.devices must be a fs.devices.Devices, got "
                            f"{type(self.devices).__name__}")
        if self.deadline is not None and (not _is_number(self.deadline)
                                          or not self.deadline > 0):
            raise ValueError(f"deadline must be a finite number of seconds > 0 (or None for "
                             f"no deadline), got {self.deadline!r}")
        if not _is_number(self.over_selection) or not self.over_selection >= 1:
            raise ValueError(f"over_selection must be a number >= 1 (1.3 draws 30% more "
                             f"clients than counted), got {self.over_selection!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.availability is not None:
            if not isinstance(self.availability, Availability):
                raise TypeError(f"availability must be a fs.devices.Availability "
                                f"(diurnal(...), fedscale_availability(...)) or None, got "
                                f"{type(self.availability).__name__}")
            if self.availability.num_clients != self.devices.num_clients:
                raise ValueError(f"availability covers {self.availability.num_clients} "
                                 f"clients, the devices {self.devices.num_clients}")
        if not isinstance(self.keep_partial, bool):
            raise TypeError(f"keep_partial must be a bool, got {self.keep_partial!r}")
        if self.availability is not None and self.deadline is None:
            raise ValueError("availability needs a deadline: a round that finds no client "
                             "available lasts the deadline, so the clock (and with it who is "
                             "available) moves on")
        if self.keep_partial and self.deadline is None:
            raise ValueError("keep_partial needs a deadline (the work that fits before it is "
                             "kept)")

    @property
    def selects(self) -> bool:
        """Whether the model draws the cohort itself (over-selection or availability)."""
        return self.over_selection > 1 or self.availability is not None

    def draw_size(self, cohort_size: int) -> int:
        """Clients drawn a round for `cohort_size` counted (the compiled cohort's size)."""
        # The epsilon keeps 1.3 x 10 at 13, not 14 from its float rounding up.
        return min(self.devices.num_clients, math.ceil(self.over_selection * cohort_size
                                                       - 1e-9))

    def name(self) -> str:
        avail = None if self.availability is None else self.availability.name
        return (f"DeviceModel(devices {self.devices.fingerprint()}, deadline={self.deadline}, "
                f"over_selection={self.over_selection}, dropout={self.dropout}, "
                f"availability={avail}, keep_partial={self.keep_partial})")

    def select(self, cohort_size: int, *, seed: int, round_num: int,
               clock: float) -> tuple[np.ndarray, int]:
        """Round `round_num`'s draw, uniform without replacement among the clients available
        at `clock`, seeded by (seed, round): `draw_size(cohort_size)` of them, or all the
        available ones when fewer are. Returns the positions and the number available."""
        if self.availability is None:
            candidates = np.arange(self.devices.num_clients)
        else:
            candidates = np.flatnonzero(self.availability(None, clock))
        k = min(self.draw_size(cohort_size), len(candidates))
        ids = np.random.default_rng([seed, round_num, 5]).choice(candidates, k, replace=False)
        return ids.astype(np.int64), len(candidates)

    def plan(self, ids: np.ndarray, steps: np.ndarray, *, seed: int, round_num: int,
             start: float, target: int, batch_size: int, download_bytes: float,
             upload_bytes: float, fixed_examples: np.ndarray | int = 0,
             num_available: int | None = None) -> RoundPlan:
        """The round's plan for the drawn clients `ids` with their planned local `steps` of
        `batch_size` examples (`fixed_examples`: examples each processes in the round's other
        passes, which a deadline does not cut), counting at most `target` of them.

        A client's time is download + (fixed_examples + steps x batch_size) x example_time +
        upload. Dropouts never report; a client past the deadline reports the steps that fit
        (`keep_partial`) or nothing; of the rest the first `target` to report count (ties by
        client id)."""
        ids = np.asarray(ids, np.int64)
        steps = np.asarray(steps, np.int64)
        d = self.devices
        example = d.example_time[ids]
        step_time = batch_size * example
        fixed = d.client_times(ids, 0, batch_size, download_bytes, upload_bytes) + \
            np.asarray(fixed_examples, np.float64) * example
        time = fixed + steps * step_time
        dropped = (_unit(seed, round_num, ids, _DROPOUT_SALT) < self.dropout
                   if self.dropout else np.zeros(len(ids), bool))
        budget = steps.copy()
        late = np.zeros(len(ids), bool)
        partial = np.zeros(len(ids), bool)
        if self.deadline is not None:
            late = ~dropped & (time > self.deadline)
            if self.keep_partial:
                with np.errstate(divide="ignore", invalid="ignore"):
                    fit = np.where(step_time > 0, np.floor((self.deadline - fixed) / step_time),
                                   0)
                fit = np.clip(fit, 0, steps).astype(np.int64)
                fit = fit - (fixed + fit * step_time > self.deadline)  # floor's rounding
                partial = late & (fit >= 1)
                budget = np.where(partial, fit, budget)
                time = np.where(partial, fixed + fit * step_time, time)
        reports = ~dropped & (~late | partial)
        first = np.lexsort((ids, time))
        first = first[reports[first]][:target]
        counted = np.zeros(len(ids), bool)
        counted[first] = True
        if len(first) and len(first) >= target:
            round_time = float(time[first].max())
        elif self.deadline is not None:
            round_time = float(self.deadline)
        else:
            round_time = float(time[first].max()) if len(first) else 0.0
        return RoundPlan(
            ids=ids[counted], max_steps=budget[counted], client_time=time[counted],
            start=float(start), round_time=round_time, num_sampled=len(ids),
            num_dropped=int(dropped.sum()), num_late=int(late.sum()),
            num_partial=int((partial & counted).sum()),
            num_unselected=int(reports.sum() - counted.sum()),
            num_available=d.num_clients if num_available is None else int(num_available))

    def record(self, plan: RoundPlan) -> dict:
        """A round record's device fields."""
        out = {"virtual_time": plan.end, "round_time": plan.round_time,
               "num_sampled": plan.num_sampled, "num_dropped": plan.num_dropped,
               "num_late": plan.num_late}
        if self.keep_partial:
            out["num_partial"] = plan.num_partial
        if self.over_selection > 1:
            out["num_unselected"] = plan.num_unselected
        if self.availability is not None:
            out["num_available"] = plan.num_available
        return out
