"""The benchmark workloads W1-W4, shared by every system's driver (numpy and stdlib only, so
that the peers' virtual environments can import it too).

Each workload fixes the model shape, the data each client holds, the batch size, the local
epochs and the learning rates; every system trains exactly this. The data are synthetic and
seeded (`client_data`), generated identically in every environment (numpy's PCG64 streams are
stable across numpy versions).

Also here: the analytic FLOPs and bytes of a round (XLA's `cost_analysis()` counts a loop body
once, not once per iteration, so it cannot count a round), and the timing protocol every driver
follows (`time_rounds`, `result_line`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

SEED = 0
RESULT_PREFIX = "RESULT "


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: str                  # "mlp", "logistic", "cnn", "char_lstm"
    x_shape: tuple[int, ...]    # one example's input
    x_dtype: str                # "float32" or "int32" (token ids)
    num_classes: int            # classes, or the vocabulary size for sequences
    examples_per_client: int
    batch_size: int
    epochs: int
    client_lr: float
    server_lr: float

    @property
    def steps_per_client(self) -> int:
        return self.epochs * math.ceil(self.examples_per_client / self.batch_size)

    @property
    def num_params(self) -> int:
        return sum(n for _, n in param_shapes(self))

    def flops_per_example(self) -> int:
        """Matmul/conv FLOPs of one example's forward and backward pass (one local step's
        share): forward, weight gradient, and input gradient for every layer whose input needs
        one (not the first layer's data input). Biases, activations, pooling, the loss and the
        optimizer update (elementwise, well under 5% here) are left out."""
        return flops_per_example(self)

    def flops_per_round(self, cohort: int) -> int:
        return cohort * self.epochs * self.examples_per_client * self.flops_per_example()

    def data_bytes_per_client(self) -> int:
        x = int(np.prod(self.x_shape)) * 4
        y = 4 * (SEQ_LEN if self.model == "char_lstm" else 1)
        return self.examples_per_client * (x + y)

    def traffic_bytes_per_client(self) -> int:
        """Memory traffic a client cannot avoid, f32: read the server params (4P), read and
        write the running sum of weighted deltas (8P), read its data once. Per-step parameter
        traffic is left out: while K clients' params and gradients fit in cache (4P = 0.6 MB
        for W1) it never reaches memory."""
        return 12 * self.num_params + self.data_bytes_per_client()

    def traffic_bytes_per_round(self, cohort: int) -> int:
        return cohort * self.traffic_bytes_per_client()

    def footprint_bytes_per_client(self) -> int:
        """Device memory a client in a chunk holds (the design's formula, SGD: no optimizer
        slots): params and gradient 4P(2 + 0), plus its data slice; activations (one batch)
        are left out."""
        return 4 * self.num_params * 2 + self.data_bytes_per_client()


CHAR_VOCAB = 90   # FedJAX's Shakespeare: 86 characters + PAD, BOS, EOS, OOV
SEQ_LEN = 80

WORKLOADS = {
    "W1": Workload("W1", "MLP 784-200-10, 64 examples/client, batch 16, 1 epoch",
                   "mlp", (784,), "float32", 10, 64, 16, 1, 0.1, 1.0),
    "W2": Workload("W2", "logistic regression 784-10, 64 examples/client, batch 16, 1 epoch",
                   "logistic", (784,), "float32", 10, 64, 16, 1, 0.1, 1.0),
    "W3": Workload("W3", "EMNIST CNN (1.2M params), 200 examples/client, batch 20, 1 epoch",
                   "cnn", (28, 28, 1), "float32", 62, 200, 20, 1, 0.1, 1.0),
    "W4": Workload("W4", "Shakespeare char-LSTM, 100 sequences of 80 chars/client, batch 10, "
                   "1 epoch", "char_lstm", (SEQ_LEN,), "int32", CHAR_VOCAB, 100, 10, 1, 1.0,
                   1.0),
}

# The layer shapes of each model, for parameter and FLOP counts.
MLP_HIDDEN = 200
CNN = {"conv1": 32, "conv2": 64, "dense": 128, "kernel": 3}
LSTM = {"embed": 8, "hidden": 256, "layers": 2}


def pairs(dims):
    """(fan-in, fan-out) of each dense layer of a stack with these widths."""
    return list(zip(dims[:-1], dims[1:], strict=True))


def param_shapes(w: Workload) -> list[tuple[str, int]]:
    if w.model == "mlp":
        dims = [784, MLP_HIDDEN, w.num_classes]
    elif w.model == "logistic":
        dims = [784, w.num_classes]
    elif w.model == "cnn":
        k = CNN["kernel"]
        flat = 12 * 12 * CNN["conv2"]
        return [("conv1", k * k * 1 * CNN["conv1"] + CNN["conv1"]),
                ("conv2", k * k * CNN["conv1"] * CNN["conv2"] + CNN["conv2"]),
                ("dense1", flat * CNN["dense"] + CNN["dense"]),
                ("dense2", CNN["dense"] * w.num_classes + w.num_classes)]
    else:
        e, h, v = LSTM["embed"], LSTM["hidden"], w.num_classes
        out = [("embed", v * e)]
        for layer in range(LSTM["layers"]):
            n_in = e if layer == 0 else h
            out.append((f"lstm{layer}", 4 * (n_in + h + 1) * h))
        return out + [("dense", (h + 1) * v)]
    return [(f"dense{i}", a * b + b) for i, (a, b) in enumerate(pairs(dims))]


def flops_per_example(w: Workload) -> int:
    def dense(a, b, needs_input_grad):       # forward + weight grad (+ input grad)
        return (6 if needs_input_grad else 4) * a * b

    if w.model in ("mlp", "logistic"):
        dims = [784, MLP_HIDDEN, w.num_classes] if w.model == "mlp" else [784, w.num_classes]
        return sum(dense(a, b, i > 0) for i, (a, b) in enumerate(pairs(dims)))
    if w.model == "cnn":
        k = CNN["kernel"]
        conv1 = 2 * 26 * 26 * CNN["conv1"] * k * k * 1                # VALID, 28 -> 26
        conv2 = 2 * 24 * 24 * CNN["conv2"] * k * k * CNN["conv1"]      # 26 -> 24
        return (2 * conv1 + 3 * conv2 + dense(12 * 12 * CNN["conv2"], CNN["dense"], True)
                + dense(CNN["dense"], w.num_classes, True))
    e, h, v = LSTM["embed"], LSTM["hidden"], w.num_classes
    per_token = sum(dense((e if layer == 0 else h) + h, 4 * h, True)
                    for layer in range(LSTM["layers"])) + dense(h, v, True)
    return SEQ_LEN * per_token


def client_data(w: Workload, num_clients: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """All clients' examples, client i owning rows [i*n, (i+1)*n) for n = examples_per_client.

    Features are standard normal (images too: the speed of a round does not depend on them),
    labels uniform; for W4, x are token ids 1..V-1 (no padding) and y is x shifted by one."""
    rng = np.random.default_rng(seed)
    n = num_clients * w.examples_per_client
    if w.model == "char_lstm":
        tokens = rng.integers(1, w.num_classes, (n, SEQ_LEN + 1), dtype=np.int32)
        return tokens[:, :-1].copy(), tokens[:, 1:].copy()
    x = rng.standard_normal((n, *w.x_shape), dtype=np.float32)
    y = rng.integers(0, w.num_classes, n).astype(np.int32)
    return x, y


def split_clients(w: Workload, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """`client_data`'s arrays as one (x, y) pair of views per client."""
    n = w.examples_per_client
    return [(x[i:i + n], y[i:i + n]) for i in range(0, len(y), n)]


# -- the protocol every driver follows ----------------------------------------------------------

def peak_host_mb() -> float:
    """Peak resident memory of this process (`VmHWM`; `ru_maxrss` is no use here: Linux keeps
    the parent's high-water mark across fork and exec) plus its waited-for children, MB."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return hwm / 1024 + children
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + children


def reset_peak_host_mb() -> bool:
    """Resets this process's `VmHWM` to its current RSS (Linux: "5" to /proc/self/clear_refs),
    so that `peak_host_mb` covers what runs from here; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MAX_TIMED_ROUNDS = 1000


def time_rounds(run_round: Callable[[], None], rounds: int, warmup: int = 1,
                min_seconds: float = 0.0) -> dict:
    """Calls `run_round` (which must block until its round is done) `warmup` times, then
    times at least `rounds` calls and goes on until the timed ones add up to `min_seconds`
    (at most `MAX_TIMED_ROUNDS`): on a shared machine a slow spell lasts seconds, so the
    median of five 0.06 s rounds can land inside one.

    Returns `first_round_s` (includes any lazy compilation), `round_s` (the timed rounds) and
    their median `s_per_round` and minimum `s_per_round_min`."""
    times = []
    while (len(times) < warmup + rounds
           or (sum(times[warmup:]) < min_seconds and len(times) < warmup + MAX_TIMED_ROUNDS)):
        t = time.perf_counter()
        run_round()
        times.append(time.perf_counter() - t)
    timed = times[warmup:]
    return {"first_round_s": times[0], "round_s": timed,
            "s_per_round": statistics.median(timed), "s_per_round_min": min(timed)}


def result_line(row: dict) -> None:
    """Prints the driver's result as one JSON line the suite picks up."""
    row = {"peak_mem_mb": round(peak_host_mb(), 1), "pid": os.getpid(), **row}
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    sys.stdout.flush()


def driver_parser(description: str, own_loop: bool = True):
    """The command line every driver takes: --workload, --cohort, --rounds, and for drivers
    that run the rounds themselves (`own_loop`: not pfl or Flower, whose frameworks run a
    count fixed in advance) --min-seconds."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--cohort", type=int, required=True)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up")
    if own_loop:
        p.add_argument("--min-seconds", type=float, default=0.0,
                       help="time more rounds until they add up to this (see time_rounds)")
    return p
