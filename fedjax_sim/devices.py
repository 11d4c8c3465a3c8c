"""Device profiles: how fast each client computes and communicates, for a virtual clock.

A client's time in a round is download + local steps x step time + upload, each from its own
profile: `Devices.client_times`. The profiles are host-side numpy arrays indexed by population
position; nothing here runs in the compiled round (the device model turns into per-client step
budgets and weights before packing).
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
