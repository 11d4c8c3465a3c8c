"""Seconds per round of fedjax_sim against a per-client-jit Python loop (FedJAX's pattern).

The workload: FedAvg on a 784-200-10 ReLU MLP, every client holding 64 synthetic examples,
batch 16, one local epoch (4 local steps), client SGD 0.1, server SGD 1.0; cohorts of 100 and
1,000 clients with population = cohort, so every client trains every round.

  python benchmarks/core.py           # full run (~5 min on a 2-core CPU)
  python benchmarks/core.py --quick   # smoke test (~1 min): 100 clients, K in {1, auto},
                                      # 2 timed rounds

Writes `benchmarks/results/core-<machine>.json` (one row per measurement) and `.md` (a table);
`--quick` writes `core-<machine>-quick.*`. See benchmarks/README.md for the columns.

How each number is measured:
  * All systems of one cohort size are built and compiled first, then run one warm-up round
    each and then the timed rounds interleaved (a round of each system in turn), so that load
    from other processes on a shared machine falls on all of them alike. `s/round` is the
    median of the timed rounds.
  * fedjax_sim runs through its public API: one `fs.Simulation` per system, its rounds run as
    `fs.simulate` runs them (`run_fedjax_sim.SimulationRounds`: `sim.step` runs round r while
    round r+1 is packed on a background thread; `step` fetches the round's record). Setting up
    a system runs its first round, which compiles the round program (`compile_s`, the
    Simulation's `timings["compile_s"]`); the warm-up and timed rounds follow it. fedjax_sim's
    caches of earlier runs (chosen K, compiled programs: `FEDJAX_SIM_CACHE_DIR`) are off.
  * fedjax_sim with K=auto: a `fs.Simulation(chunk_size=None)`, which searches as
    `fs.simulate(chunk_size=None)` does (`autotune_s`, its `timings["chunk_size_choice_s"]`),
    measured as one more system in the interleaved set (a separate instance, even when its K
    is also in the fixed-K list); its `compile_s` is what remains to compile after the search
    (0: the search compiled the winner).
  * loop: `benchmarks/loop.py`; `compile_s` is the AOT compile of its three jitted functions.
  * Before timing, one round of each system from the same params with shuffling off must agree
    to 1e-5 (asserted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402
from limits import matmul_rate  # noqa: E402
from loop import LoopFedAvg, client_arrays  # noqa: E402
from run_fedjax_sim import SimulationRounds, no_caches  # noqa: E402

import fedjax_sim as fs

FEATURES, HIDDEN, CLASSES = 784, (200,), 10
EXAMPLES_PER_CLIENT, BATCH, EPOCHS = 64, 16, 1
CLIENT_LR, SERVER_LR = 0.1, 1.0
WORKLOAD = "fedavg-mlp-784-200-10/64ex/b16/e1"
SEED = 0
CHECK_TOL = 1e-5


# -- setup -------------------------------------------------------------------------------------

def make_data(num_clients: int, seed: int = SEED):
    rng = np.random.default_rng(seed)
    n = num_clients * EXAMPLES_PER_CLIENT
    x = rng.standard_normal((n, FEATURES), dtype=np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    return fs.data.from_arrays(np.repeat(np.arange(num_clients), EXAMPLES_PER_CLIENT),
                               {"x": x, "y": y})


def make_model():
    return fs.models.mlp(FEATURES, CLASSES, hidden=HIDDEN)


def make_algo(model, shuffle: bool = True):
    return fs.algorithms.fedavg(model, optax.sgd(CLIENT_LR), optax.sgd(SERVER_LR),
                                batch_size=BATCH, num_epochs=EPOCHS, shuffle=shuffle)


def make_loop(model):
    return LoopFedAvg(model, optax.sgd(CLIENT_LR), optax.sgd(SERVER_LR), batch_size=BATCH,
                      num_epochs=EPOCHS)


def flops_per_example_step() -> int:
    """Exact matmul FLOPs for one example's forward and backward pass through the dense layers:
    forward 2ab per layer, weight gradient 2ab per layer, input gradient 2ab for every layer but
    the first (the data needs no gradient). Biases, ReLU, softmax and the SGD update are left
    out (under 1% here)."""
    dims = (FEATURES, *HIDDEN, CLASSES)
    layers = list(zip(dims[:-1], dims[1:], strict=True))
    return sum(4 * a * b for a, b in layers) + sum(2 * a * b for a, b in layers[1:])


def num_params() -> int:
    dims = (FEATURES, *HIDDEN, CLASSES)
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=True))


def flops_per_round(cohort: int) -> int:
    return cohort * EXAMPLES_PER_CLIENT * EPOCHS * flops_per_example_step()


# -- machine -----------------------------------------------------------------------------------

def machine_name() -> tuple[str, str]:
    """(human-readable name, file-name slug), as the suite names machines."""
    dev = jax.devices()[0]
    return suite.machine_name({"platform": dev.platform, "device_kind": dev.device_kind,
                               "device_count": jax.device_count()})


def measure_matmuls(quick: bool) -> dict[str, float]:
    target = 1e9 if quick else 1e10
    shapes = {"16x784@784x200": (BATCH, FEATURES, 200),
              "64x784@784x200": (64, FEATURES, 200),
              "1024x1024@1024x1024": (1024, 1024, 1024)}
    return {name: round(matmul_rate(*s, target_flops=target, repeats=5 if quick else 10), 2)
            for name, s in shapes.items()}


# -- correctness -------------------------------------------------------------------------------

def check_against_loop(train, model, chunk_sizes) -> float:
    """One round from the same params, shuffling off on both sides: the params must agree."""
    init = model.init(jax.random.key(SEED))
    loop = make_loop(model)
    params, opt_state = loop.init(init)
    want, _ = loop.round(params, opt_state, client_arrays(train), rng=None)
    want = jax.tree.map(np.asarray, want)
    algo = make_algo(model, shuffle=False)
    worst = 0.0
    for k in chunk_sizes:
        got = fs.simulate(algo, train, rounds=1, cohort_size=train.num_clients, params=init,
                          chunk_size=k, progress=False).params
        diff = max(float(np.max(np.abs(g - w))) for g, w in
                   zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
        moved = max(float(np.max(np.abs(g - np.asarray(i)))) for g, i in
                    zip(jax.tree.leaves(got), jax.tree.leaves(init), strict=True))
        print(f"  check C={train.num_clients} K={k}: max |fedjax_sim - loop| = {diff:.2e} "
              f"(params moved by up to {moved:.2e})", flush=True)
        assert moved > 100 * CHECK_TOL, "the round did not change the params: check is vacuous"
        assert diff <= CHECK_TOL, (
            f"fedjax_sim (K={k}) and the loop disagree after one round: max abs diff {diff}")
        worst = max(worst, diff)
    return worst


# -- timing ------------------------------------------------------------------------------------
#
# Each system is set up (and compiled) first; then rounds are interleaved, one round of each
# system in turn, so that load from other processes on a shared machine hits all alike.

class EngineSystem:
    """fedjax_sim at a fixed K (or, for `k=None`, the K `fs.simulate(chunk_size=None)` chooses),
    a `fs.Simulation` run as `fs.simulate` runs it (`SimulationRounds`). Its first round, run
    here, compiles the round program."""

    def __init__(self, algo, train, cohort: int, k: int | None):
        self.sim = fs.Simulation(algo, train, cohort_size=cohort, seed=SEED, chunk_size=k,
                                 resident=True, progress=False)
        self.k = self.sim.chunk_size
        self.autotune_s = self.sim.timings["chunk_size_choice_s"]
        self.memory = self.sim.memory_analysis()  # compiles (unless the search did)
        self.rounds = SimulationRounds(self.sim)
        self.round()
        self.compile_s = self.sim.timings["compile_s"]

    def round(self) -> None:
        self.loss = self.rounds()["train_loss"]

    def close(self) -> None:
        self.rounds.close()

    def result(self) -> dict:
        assert np.isfinite(self.loss), f"K={self.k}: train loss {self.loss}"
        temp = self.memory.temp_size_in_bytes / 2**20 if self.memory else None
        return {"system": "fedjax_sim", "chunk_size": self.k,
                "padded_cohort": self.rounds.padded_cohort, "compile_s": self.compile_s,
                "temp_mb": temp, "final_train_loss": self.loss}


class LoopSystem:
    def __init__(self, model, train):
        self.loop = make_loop(model)
        self.params, self.opt_state = self.loop.init(model.init(jax.random.key(SEED)))
        self.clients = client_arrays(train)
        self.compile_s = self.loop.compile(self.params,
                                           {k: v[:BATCH] for k, v in self.clients[0].items()})
        self.rng = np.random.default_rng(SEED)

    def round(self) -> None:
        self.params, self.opt_state = jax.block_until_ready(
            self.loop.round(self.params, self.opt_state, self.clients, self.rng))

    def close(self) -> None:
        pass

    def result(self) -> dict:
        return {"system": "loop", "chunk_size": None, "compile_s": self.compile_s}


def time_interleaved(systems: list, rounds: int, label: str) -> list[dict]:
    """One warm-up round of each system, then `rounds` timed rounds of each, interleaved."""
    times = [[] for _ in systems]
    for rep in range(1 + rounds):
        for i, s in enumerate(systems):
            t = time.perf_counter()
            s.round()
            times[i].append(time.perf_counter() - t)
        if rep == 0:
            print(f"  {label}: warm-up done", flush=True)
    return [{**s.result(), "first_round_s": ts[0], "round_s": ts[1:]}
            for s, ts in zip(systems, times, strict=True)]


# -- report ------------------------------------------------------------------------------------

def finish_rows(rows: list[dict], common: dict, peak: float, small: float) -> None:
    loop_s = {r["cohort"]: r["s_per_round"] for r in rows if r["system"] == "loop"}
    for r in rows:
        flops = flops_per_round(r["cohort"])
        r["flops_per_round"] = flops
        r["gflops"] = flops / r["s_per_round"] / 1e9
        r["roofline_frac"] = (flops / (peak * 1e9)) / r["s_per_round"]
        r["roofline_frac_b16"] = (flops / (small * 1e9)) / r["s_per_round"]
        r["speedup_vs_loop"] = (loop_s[r["cohort"]] / r["s_per_round"]
                                if r["cohort"] in loop_s else None)
        r.update(common)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    mm = meta["matmul_gflops"]
    lines = [
        f"# core benchmark: {meta['machine']}",
        "",
        f"{meta['date']}, jax {meta['jax_version']}, mode {meta['mode']}, "
        f"{meta['rounds']} timed rounds after 1 warm-up; load average "
        f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end; total "
        f"{meta['total_s']:.0f} s.",
        "",
        f"Workload: {WORKLOAD}: FedAvg, MLP {FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES} "
        f"({num_params():,} params), {EXAMPLES_PER_CLIENT} examples per client, batch {BATCH}, "
        f"{EPOCHS} epoch, client SGD {CLIENT_LR}, server SGD {SERVER_LR}. "
        f"{flops_per_example_step():,} matmul FLOPs per example per step "
        f"(6 x params would be {6 * num_params():,}).",
        "",
        "Measured f32 matmul rates (GFLOP/s): "
        + ", ".join(f"{k}: {v:.1f}" for k, v in mm.items())
        + f". `% peak` = achieved GFLOP/s / {meta['peak_gflops']:.1f}; `% b16` = achieved / "
        f"the 16x784@784x200 rate ({meta['b16_gflops']:.1f}).",
        "",
        f"Correctness: one round with shuffling off, fedjax_sim vs loop, max |diff| = "
        f"{meta['check_max_abs_diff']:.1e} (asserted <= {CHECK_TOL:g}).",
        "",
        "| cohort | system | K | s/round (median) | min | compile s | autotune s | GFLOP/s "
        "| % peak | % b16 | speedup vs loop | temp MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k = r["chunk_size"]
        kstr = "-" if k is None else (f"auto={k}" if r.get("autotuned") else str(k))
        if r.get("padded_cohort") and r["padded_cohort"] != r["cohort"]:
            kstr += f" (pad {r['padded_cohort']})"
        lines.append(
            f"| {r['cohort']} | {r['system']} | {kstr} | {r['s_per_round']:.4f} | "
            f"{r['s_per_round_min']:.4f} | {fmt(r['compile_s'], '.2f')} | "
            f"{fmt(r.get('autotune_s'), '.2f')} | {r['gflops']:.2f} | "
            f"{100 * r['roofline_frac']:.1f} | {100 * r['roofline_frac_b16']:.1f} | "
            f"{fmt(r['speedup_vs_loop'], '.2f')} | {fmt(r.get('temp_mb'), '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 100 clients, K in {1, auto}, 2 rounds")
    p.add_argument("--cohorts", type=int, nargs="+", help="default 100 1000 (quick: 100)")
    p.add_argument("--chunk-sizes", type=int, nargs="+",
                   help="K values besides auto; default 1 2 4 8 16 and C (quick: 1 only)")
    p.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 7; "
                   "quick: 2)")
    p.add_argument("--no-auto", action="store_true", help="skip the chunk_size=None row")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    no_caches()  # every run compiles and searches (see the module docstring)

    t_start = time.perf_counter()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    cohorts = args.cohorts or ([100] if args.quick else [100, 1000])
    base_ks = args.chunk_sizes or ([1] if args.quick else [1, 2, 4, 8, 16])
    rounds = args.rounds or (2 if args.quick else 7)
    name, slug = machine_name()
    print(f"machine: {name}; jax {jax.__version__}; devices {jax.devices()}", flush=True)

    mm = measure_matmuls(args.quick)
    peak, b16 = max(mm.values()), mm["16x784@784x200"]
    print(f"matmul GFLOP/s: {mm}", flush=True)

    model = make_model()
    algo = make_algo(model)
    check_c = min(cohorts)
    check_ks = [1, 4] if args.quick else sorted({1, 4, 16, check_c})
    check = check_against_loop(make_data(check_c), model, check_ks)

    rows = []
    for c in cohorts:
        train = make_data(c)
        ks = sorted({k for k in base_ks if k < c} | (set() if args.quick else {c}))
        jax.clear_caches()  # compile times below are cold (the check compiled similar programs)
        systems = [LoopSystem(model, train)]
        print(f"C={c} loop: compile {systems[0].compile_s:.2f} s", flush=True)
        for k in ks:
            systems.append(EngineSystem(algo, train, c, k))
            print(f"C={c} K={k}: compile {systems[-1].compile_s:.2f} s", flush=True)
        auto = None
        if not args.no_auto:
            jax.clear_caches()  # the search from cold, as in a fresh fs.simulate call
            auto = EngineSystem(algo, train, c, None)
            systems.append(auto)
            print(f"C={c} autotune: K={auto.k} in {auto.autotune_s:.2f} s; then compile "
                  f"{auto.compile_s:.2f} s", flush=True)
        results = time_interleaved(systems, rounds, f"C={c}")
        for system in systems:
            system.close()
        if auto is not None:
            results[-1].update(autotuned=True, autotune_s=auto.autotune_s)
        del systems, auto
        for r in results:
            print(f"C={c} {r['system']} K={r['chunk_size']}: "
                  f"{statistics.median(r['round_s']):.4f} s/round", flush=True)
            rows.append({"cohort": c, **r})

    for r in rows:
        r.setdefault("autotuned", False)
        r["workload"] = WORKLOAD
        r["s_per_round"] = statistics.median(r["round_s"])
        r["s_per_round_min"] = min(r["round_s"])
    meta = {
        "machine": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "mode": "quick" if args.quick else "full",
        "rounds": rounds,
        "matmul_gflops": mm,
        "peak_gflops": peak,
        "b16_gflops": b16,
        "check_max_abs_diff": check,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    finish_rows(rows, meta, peak, b16)
    meta["total_s"] = time.perf_counter() - t_start
    order = ["workload", "cohort", "system", "chunk_size", "autotuned", "s_per_round",
             "s_per_round_min", "compile_s", "machine", "date", "jax_version",
             "speedup_vs_loop", "flops_per_round", "gflops", "roofline_frac"]
    rows = [{**{k: r[k] for k in order}, **{k: v for k, v in r.items() if k not in order}}
            for r in rows]

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"core-{slug}" + ("-quick" if args.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows, meta)
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / stem}.json and .md ({meta['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
