"""Benchmark suites: fedjax_sim side by side with the per-client-jit loop, FedJAX, pfl and
Flower on the workloads W1-W4 (workloads.py), in one run.

  python benchmarks/suite.py cpu      # this machine's CPU suite (65-90 min on 2 cores)
  python benchmarks/suite.py gpu      # the GPU suite (run on the GPU machine)
  python benchmarks/suite.py quick    # smoke test, about 2 min: W1/W2 small cohorts

Writes `benchmarks/results/<suite>-<machine>.json` (a list of rows, one per workload, cohort
and system), `.md` (tables) and `.png` (seconds per round against cohort size).

Every (workload, cohort, system) runs in a fresh process: the system's driver, in its own
virtual environment for the peers (`benchmarks/peers/setup.sh` creates them; a peer whose
environment is missing is skipped and listed). Each driver builds the same data, runs one
warm-up round and `--rounds` timed rounds (more where they take under `min_seconds`, for the
drivers that run their own rounds), and reports the median; peak host memory is that
process's. Before and after the runs, the suite measures the device's f32 matmul rate and memory
bandwidth (limits.py, in a child process); the roofline floor of a round is max(FLOPs / matmul
rate, bytes / bandwidth) with FLOPs and bytes counted analytically (workloads.py), and
`roofline_fraction` = floor / time against the higher of the two measurements;
`roofline_fraction_beside` (fedjax_sim rows) uses the limits measured right after that run.
Ratios to fedjax_sim are taken within the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import RESULT_PREFIX, WORKLOADS  # noqa: E402

PEERS = HERE / "peers"
CPU_PASSES = 3
SYSTEMS = ("fedjax_sim", "loop", "fedjax", "pfl", "flower")
OWN_LOOP = ("fedjax_sim", "loop", "fedjax")  # pfl's and Flower's frameworks run the rounds


@dataclasses.dataclass(frozen=True)
class Run:
    workload: str
    cohort: int
    system: str
    args: tuple[str, ...] = ()
    variant: str | None = None   # a second configuration of the same system (not the headline)
    rounds: int = 5
    min_seconds: float = 5.0     # drivers running their own rounds time at least this long
    repeat: int = 0              # which pass over its (workload, cohort) cell
    env: str | None = None       # a peer's environment, `peers/.venv-<env>` (default: system)

    @property
    def key(self) -> tuple:
        """The row it produces, as `row_key` names rows."""
        return self.workload, self.cohort, self.system, self.variant, self.repeat


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plan(suite: str) -> list[Run]:
    """The runs of a suite, in order: one (workload, cohort) cell at a time, fedjax_sim first
    (last in every second pass), so the runs a ratio compares follow each other within
    minutes (load from other tenants of a shared machine drifts over minutes: measured 1.5x
    swings in one system's time). On the CPU, the cells with short rounds (W1, W2) are run
    `CPU_PASSES` times, pass after pass, and a ratio is the median of the passes' ratios
    (`combine_passes`)."""
    runs: list[Run] = []

    def add(workload, cohorts, systems, passes=1, **kw):
        runs.extend(Run(workload, c, s, repeat=i, **kw)
                    for c in cohorts for i in range(passes) for s in systems)

    # On a CPU, fedjax_sim splits the host into one XLA device per core (its recommended CPU
    # setup); the 1-device variant is measured too.
    cores = ("--devices", str(cpu_cores()))
    if suite == "quick":
        quick = {"rounds": 2, "min_seconds": 0.0}
        add("W1", [10, 100], ["fedjax_sim"], args=cores, **quick)
        add("W1", [10, 100], ["loop", "fedjax", "pfl"], **quick)
        add("W2", [100], ["fedjax_sim"], args=cores, passes=2, **quick)
        add("W2", [100], ["loop", "fedjax"], passes=2, **quick)
    elif suite == "cpu":
        many = {"passes": CPU_PASSES}
        add("W1", [10, 30, 100, 300, 1000], ["fedjax_sim"], args=cores, **many)
        add("W1", [100, 1000], ["fedjax_sim"], variant="1 device")
        add("W1", [10, 30, 100, 300, 1000], ["loop"], **many)
        add("W1", [10, 100, 1000], ["fedjax"], **many)
        add("W1", [100, 1000], ["pfl"], **many)
        add("W1", [100], ["flower"], **many)
        # FedJAX 0.0.17 as pinned (jax 0.4.20) above; here on the current JAX (two removed
        # aliases restored by its driver), which runs its per-client loop faster.
        add("W1", [100, 1000], ["fedjax"], variant="current JAX", env="fedjax-current", **many)
        add("W2", [1000], ["fedjax_sim"], args=cores, **many)
        add("W2", [1000], ["fedjax_sim"], variant="1 device")
        add("W2", [1000], ["loop", "fedjax", "pfl"], **many)
        add("W2", [1000], ["fedjax"], variant="current JAX", env="fedjax-current", **many)
        add("W3", [10, 100], ["fedjax_sim"], args=cores)
        add("W3", [10, 100], ["loop", "fedjax", "pfl"])
        add("W4", [10], ["fedjax_sim"], args=cores)
        add("W4", [10], ["loop", "fedjax", "pfl"])
    elif suite == "gpu":
        add("W1", [10, 100, 1000, 10000], ["fedjax_sim", "loop", "fedjax"])
        add("W1", [100, 1000], ["pfl"])
        add("W1", [100], ["flower"])
        add("W2", [1000], ["fedjax_sim", "loop", "fedjax", "pfl"])
        add("W3", [10, 100, 1000, 10000], ["fedjax_sim"])
        add("W3", [10, 100, 1000], ["loop", "fedjax"])
        add("W4", [10, 100, 1000], ["fedjax_sim"])
        add("W4", [10, 100], ["loop", "fedjax"])
    else:
        raise ValueError(f"unknown suite {suite!r}: cpu, gpu or quick")
    # Within a pass the systems run in the order they were added, in every second pass in
    # reverse: a drift of the machine's speed during a pass then biases the ratios of
    # successive passes in opposite directions.
    def position(e):
        i, r = e
        return r.workload, r.cohort, r.repeat, -i if r.repeat % 2 else i

    return [r for _, r in sorted(enumerate(runs), key=position)]


def driver_args(run: Run) -> list[str]:
    """The driver's arguments (`workloads.driver_parser`)."""
    args = ["--workload", run.workload, "--cohort", str(run.cohort), "--rounds",
            str(run.rounds), *run.args]
    return args + (["--min-seconds", str(run.min_seconds)] if run.system in OWN_LOOP else [])


def command(run: Run) -> list[str] | None:
    """The driver's command line, or None when the system's environment is missing.

    A peer runs in its own environment (`peers/setup.sh`), or, where the environment variable
    `PEER_PYTHON` names an interpreter, in that one for every peer: on a machine with no
    network whose own Python has the accelerator's JAX and torch, and the peers installed from
    wheels (`peers/gpu_wheels.sh`)."""
    common = driver_args(run)
    if run.system in ("fedjax_sim", "loop"):
        return [sys.executable, str(HERE / f"run_{run.system}.py"), *common]
    python = os.environ.get("PEER_PYTHON")
    if not python:
        python = PEERS / f".venv-{run.env or run.system}" / "bin" / "python"
        if not python.exists():
            return None
    return [str(python), str(PEERS / f"run_{run.system}.py"), *common]


def row_key(row: dict) -> tuple:
    return row["workload"], row["cohort"], row["system"], row.get("variant"), row.get("repeat", 0)


def execute(run: Run, timeout: float, log) -> dict:
    cmd = command(run)
    base = {"workload": run.workload, "cohort": run.cohort, "system": run.system,
            "variant": run.variant, "repeat": run.repeat}
    if cmd is None:
        return {**base, "error": f"not installed (benchmarks/peers/setup.sh "
                                 f"{run.env or run.system})"}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=HERE.parent)
    except subprocess.TimeoutExpired as e:
        log.write(f"$ {' '.join(cmd)}\nTIMEOUT after {timeout} s\n{e.stdout or ''}\n")
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**base, "error": f"exit {proc.returncode}: {last[:300]}"}
    row = json.loads(lines[-1][len(RESULT_PREFIX):])
    return {**row, **base, "wall_s": time.perf_counter() - t}


# -- the device's limits ----------------------------------------------------------------------

def probe_device(*args: str) -> dict:
    """`limits.py`'s JSON line, from a child process: the suite's own process never opens
    the device (see limits.py)."""
    proc = subprocess.run([sys.executable, str(HERE / "limits.py"), *args], capture_output=True,
                          text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/limits.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_info() -> dict:
    """What the default device is (what `machine_name` needs), without measuring it."""
    return probe_device("--info-only")


def measure_device(quick: bool) -> dict:
    """The device's f32 matmul rate and memory bandwidth (`limits.measure`)."""
    return probe_device(*["--quick"] * quick)


def limits_beside() -> dict:
    """The limits measured right after a fedjax_sim run, under the load it ran in (load from
    other tenants of a shared machine lowers them): quick, about 2 s on the CPU."""
    device = measure_device(quick=True)
    return {k: device[k] for k in ("peak_gflops", "bandwidth_gbs")}


def best_limits(start: dict, end: dict) -> dict:
    """The device's limits from its measurements at the start and the end of a run: each
    figure's higher value (load from other tenants only ever lowers a measured rate: 113 to
    157 GFLOP/s for the same 2-core CPU across runs)."""
    rates = {k: max(v, end["matmul_gflops"][k]) for k, v in start["matmul_gflops"].items()}
    return {**start, "matmul_gflops": rates, "peak_gflops": max(rates.values()),
            "bandwidth_gbs": max(start["bandwidth_gbs"], end["bandwidth_gbs"])}


def machine_name(device: dict) -> tuple[str, str]:
    """(human-readable name, file-name slug)."""
    if device["platform"] == "cpu":
        model = platform.processor() or "cpu"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        name, slug = f"{model} ({cpu_cores()} cores)", f"cpu-{model}-{cpu_cores()}c"
    else:
        name = f"{device['device_kind']} x{device['device_count']}"
        slug = f"{device['platform']}-{device['device_kind']}"
    return name, re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-")


# -- derived figures ---------------------------------------------------------------------------

def lazy_compile_s(row: dict) -> float | None:
    """Compile time of a system that compiles inside its first round (FedJAX): the first round
    minus the fastest timed one; None where the round-to-round spread hides it (a first round
    faster than every timed one)."""
    extra = row["first_round_s"] - min(row["round_s"])
    return extra if extra > 0 else None


def is_headline(r: dict) -> bool:
    """A measured fedjax_sim row in its headline configuration (the one ratios refer to)."""
    return r["system"] == "fedjax_sim" and r.get("variant") is None and "error" not in r


def floor_s(flops: float, traffic: float, limits: dict) -> float:
    """The roofline floor of a round: max(FLOPs / matmul rate, bytes / bandwidth)."""
    return max(flops / (limits["peak_gflops"] * 1e9), traffic / (limits["bandwidth_gbs"] * 1e9))


def derive(rows: list[dict], device: dict, kept: list[dict] = ()) -> None:
    """Adds the figures computed from a row's measurements and the device's limits. A ratio
    to fedjax_sim is taken within the row's pass, or against the fedjax_sim row among `kept`
    (rows of an earlier run merged into this one) where this run did not measure it."""
    in_pass = {(r["workload"], r["cohort"], r.get("repeat", 0)): r for r in rows
               if is_headline(r)}
    earlier = {(r["workload"], r["cohort"]): r for r in kept if is_headline(r)}
    for r in rows:
        if "error" in r:
            continue
        w = WORKLOADS[r["workload"]]
        flops = w.flops_per_round(r["cohort"])
        traffic = w.traffic_bytes_per_round(r["cohort"])
        floor = floor_s(flops, traffic, device)
        r.update(flops_per_round=flops, bytes_per_round=traffic,
                 gflops=flops / r["s_per_round"] / 1e9,
                 clients_per_s=r["cohort"] / r["s_per_round"],
                 roofline_floor_s=floor, roofline_fraction=floor / r["s_per_round"],
                 footprint_bytes_per_client=w.footprint_bytes_per_client())
        if r["system"] == "fedjax":
            r["compile_s"] = lazy_compile_s(r)
        if r.get("limits_beside"):
            r["roofline_fraction_beside"] = (floor_s(flops, traffic, r["limits_beside"])
                                             / r["s_per_round"])
        if r.get("plain_steps_s"):
            r["plain_steps_roofline_fraction"] = floor / r["plain_steps_s"]
        if r["system"] == "fedjax_sim" and r.get("temp_mb") is not None:
            k = r["chunk_size"] * r.get("devices", 1)
            r["measured_bytes_per_client"] = r["temp_mb"] * 2**20 / k
        ref = (in_pass.get((r["workload"], r["cohort"], r.get("repeat", 0)))
               or earlier.get((r["workload"], r["cohort"])))
        r["fedjax_sim_speedup"] = (r["s_per_round"] / ref["s_per_round"]
                                   if ref is not None else None)


# What a combined row keeps of each pass (`passes`).
PASS_FIELDS = ("s_per_round", "s_per_round_min", "fedjax_sim_speedup", "compile_s",
               "chunk_size", "roofline_fraction", "limits_beside", "roofline_fraction_beside",
               "error")


def combine_passes(rows: list[dict]) -> list[dict]:
    """One row per (workload, cohort, system, variant) from the rows of its passes: the pass
    with the median s/round (the lower median for an even count) gives the row, the ratio to
    fedjax_sim is the median of the passes' ratios (each taken within its pass), and
    `passes` keeps every pass's figures. Failed passes are dropped where another finished."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(row_key(r)[:4], []).append(r)
    out = []
    for group in cells.values():
        ok = [r for r in group if "error" not in r]
        if len(group) == 1 or not ok:
            out.append(group[0])
            continue
        _, median = statistics.median_low([(r["s_per_round"], i) for i, r in enumerate(ok)])
        row = dict(ok[median])
        ratios = [r["fedjax_sim_speedup"] for r in ok if r.get("fedjax_sim_speedup")]
        row["fedjax_sim_speedup"] = statistics.median(ratios) if ratios else None
        row["passes"] = [{k: r.get(k) for k in PASS_FIELDS} for r in group]
        row.pop("repeat", None)
        out.append(row)
    return out


# -- report ------------------------------------------------------------------------------------

def fmt(x, spec="", none="-"):
    return none if x is None else format(x, spec)


def label(r: dict) -> str:
    return r["system"] + (f" ({r['variant']})" if r.get("variant") else "")


def scaling(wr: list[dict]) -> list[str]:
    """fedjax_sim's cohort sweep in one workload's rows: throughput against cohort size, the
    cohort where it levels off (90% of its best), the chosen K, and a client's bytes in
    memory (the design's formula and XLA's temporaries per client)."""
    head = sorted((r for r in wr if is_headline(r)), key=lambda r: r["cohort"])
    if not head:
        return []
    top = max(head, key=lambda r: r["clients_per_s"])
    best = top["clients_per_s"]
    out = []
    if len(head) > 1:
        level = next(r["cohort"] for r in head if r["clients_per_s"] >= 0.9 * best)
        out += [f"fedjax_sim's cohort sweep: clients/s grows with the cohort until the device "
                f"is saturated; it first reaches 90% of the best ({best:.0f} clients/s, at "
                f"{top['cohort']} clients) at {level} clients.", ""]
    out += ["| cohort | K (auto) | clients/s | of best | bytes per client: formula | "
            "measured |", "|---:|---:|---:|---:|---:|---:|"]
    for r in head:
        measured = r.get("measured_bytes_per_client")
        out.append(f"| {r['cohort']} | {fmt(r.get('chunk_size'))} x{r.get('devices', 1)} dev | "
                   f"{r['clients_per_s']:.1f} | {r['clients_per_s'] / best:.0%} | "
                   f"{r['footprint_bytes_per_client'] / 1e6:.2f} MB | "
                   f"{fmt(measured and measured / 1e6, '.2f')} MB |")
    return out + [""]


def markdown(rows: list[dict], meta: dict) -> str:
    dev = meta["device"]
    out = [f"# {meta['suite']} suite: {meta['machine']}", "",
           f"{meta['date']}; jax {dev['jax_version']}; this run took "
           f"{meta['total_s'] / 60:.0f} min; load average {meta['loadavg_start']} at start, "
           f"{meta['loadavg_end']} at end.", ""]
    runs = meta.get("row_dates", [meta["date"]])
    if len(runs) > 1:
        out += [f"The rows come from {len(runs)} runs, ending {', '.join(runs)} (the last "
                "is this one; `--merge` kept the others' rows, which each workload's section "
                "names).", ""]
    out += ["Measured on this device at the start and the end of this run (the higher of "
            "each): f32 matmul "
            + ", ".join(f"{k}: {v} GFLOP/s" for k, v in dev["matmul_gflops"].items())
            + f"; memory bandwidth {dev['bandwidth_gbs']} GB/s. Roofline floor = max(FLOPs / "
            f"{dev['peak_gflops']} GFLOP/s, bytes / {dev['bandwidth_gbs']} GB/s).", "",
            "`x fedjax_sim` = this row's s/round over fedjax_sim's (headline configuration) "
            "at the same workload and cohort: how many times faster fedjax_sim is. "
            "`steps-only %` (fedjax_sim rows) = the roofline fraction of the round's local "
            "SGD steps run back to back, one client at a time, with nothing federated around "
            "them (`plain_steps_s`): what small per-step matmuls reach on this device. "
            "In parentheses after a fedjax_sim row's roofline %: against the limits measured "
            "right after that run (`limits_beside`), in the load it ran in; other tenants of a "
            "shared machine lower them.", ""]
    passes = max((len(r.get("passes", [1])) for r in rows), default=1)
    if passes > 1:
        out += [f"Cells with short rounds ran {passes} times, pass after pass: their s/round "
                "and other figures are the pass with the median s/round, `x fedjax_sim` is the "
                "median of the ratios taken within each pass (`passes` in the JSON lists "
                "them all).", ""]
    for name, w in WORKLOADS.items():
        wr = [r for r in rows if r["workload"] == name]
        if not wr:
            continue
        out += [f"## {name}: {w.description}", "",
                f"{w.num_params:,} params; {w.flops_per_example() / 1e6:.2f} MFLOP per "
                f"example per pass; client SGD {w.client_lr}, server SGD {w.server_lr}.", ""]
        earlier = sorted({(r["date"], r["peak_gflops"], r["bandwidth_gbs"]) for r in wr
                          if r["date"] != meta["date"]})
        out += [f"Rows measured in an earlier run ({d}), their roofline against that run's "
                f"limits: {g} GFLOP/s, {b} GB/s." for d, g, b in earlier] + [""] * bool(earlier)
        out += ["| cohort | system | s/round | min | x fedjax_sim | clients/s | compile s "
                "| peak host MB | K | GFLOP/s | roofline % | steps-only % |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(wr, key=lambda r: (r["cohort"], SYSTEMS.index(r["system"]),
                                           r.get("variant") or "")):
            if "error" in r:
                out.append(f"| {r['cohort']} | {label(r)} | {r['error']} ||||||||||")
                continue
            k = r.get("chunk_size")
            kstr = "-" if k is None else f"{k}" + (" (auto)" if r.get("autotune_s") else "")
            if r.get("devices", 1) > 1:
                kstr += f" x{r['devices']} dev"
            roof = f"{100 * r['roofline_fraction']:.1f}"
            if r.get("roofline_fraction_beside"):
                roof += f" ({100 * r['roofline_fraction_beside']:.0f})"
            out.append(
                f"| {r['cohort']} | {label(r)} | {r['s_per_round']:.4g} | "
                f"{r['s_per_round_min']:.4g} | {fmt(r['fedjax_sim_speedup'], '.2f')} | "
                f"{r['clients_per_s']:.0f} | {fmt(r.get('compile_s'), '.2f')} | "
                f"{r['peak_mem_mb']:.0f} | {kstr} | {r['gflops']:.1f} | "
                f"{roof} | "
                f"{fmt(r.get('plain_steps_roofline_fraction'), '.1%', '-').rstrip('%')} |")
        out.append("")
        out += scaling(wr)
    skipped = sorted({f"{r['system']}: {r['error']}" for r in rows if "error" in r})
    if skipped:
        out += ["Not measured: " + "; ".join(skipped), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in WORKLOADS if any(r["workload"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for system in SYSTEMS:
            for variant in sorted({r.get("variant") or "" for r in rows}):
                pts = sorted((r["cohort"], r["s_per_round"]) for r in rows
                             if r["workload"] == name and r["system"] == system
                             and (r.get("variant") or "") == variant and "error" not in r)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="s" if variant else "o",
                            color=f"C{SYSTEMS.index(system)}",  # one colour per system
                            linestyle="--" if variant else "-",
                            label=system + (f" ({variant})" if variant else ""))
        ax.set(xscale="log", yscale="log", xlabel="cohort (clients per round)",
               ylabel="seconds per round", title=f"{name}: {WORKLOADS[name].model}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=["cpu", "gpu", "quick"])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, help="only these systems")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="only these")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows this run measures in an existing results file "
                   "(the rows kept keep the device limits of the run that measured them)")
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted run of the same command: the runs it "
                   "finished (kept in <results>.partial.jsonl as they end) are not run again")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    name, slug = machine_name(device_info())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{args.suite}-{slug}"
    kept, device = [], None
    if args.merge and stem.with_suffix(".json").exists():
        kept = json.loads(stem.with_suffix(".json").read_text())
    # Each finished run is saved as it ends, so an interrupted suite loses no finished run.
    progress = stem.with_suffix(".partial.jsonl")
    done = {}
    if args.resume and progress.exists():
        first, *finished = (json.loads(ln) for ln in progress.read_text().splitlines() if ln)
        device = first["device"]  # the interrupted run's measurement at its start
        done = {row_key(r): r for r in finished}
    else:
        device = measure_device(args.suite == "quick")
        progress.write_text(json.dumps({"device": device}) + "\n")
    print(f"{name}: {device}", flush=True)
    runs = [r for r in plan(args.suite) if (not args.systems or r.system in args.systems)
            and (not args.workloads or r.workload in args.workloads)]
    rows = []
    multipass = any(r.repeat for r in runs)
    new = {r.key[:4] for r in runs}  # (workload, cohort, system, variant)
    kept = [r for r in kept if row_key(r)[:4] not in new]
    with open(f"{stem}.log", "a" if args.merge or done else "w") as log:
        for i, run in enumerate(runs):
            row = done.get(run.key)
            if row is None:
                row = execute(run, args.timeout, log)
                if run.system == "fedjax_sim" and "error" not in row:
                    row["limits_beside"] = limits_beside()
                with open(progress, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
            msg = row.get("error") or f"{row['s_per_round']:.4g} s/round"
            print(f"[{i + 1}/{len(runs)}] {run.workload} C={run.cohort} {run.system}"
                  f"{' (' + run.variant + ')' if run.variant else ''}"
                  f"{f' pass {run.repeat + 1}' if multipass else ''}: {msg}"
                  f"{' (finished before the resume)' if run.key in done else ''}", flush=True)
    measured = [device, measure_device(args.suite == "quick")]
    device = best_limits(*measured)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for r in rows:
        r.update(machine=name, date=date, suite=args.suite, peak_gflops=device["peak_gflops"],
                 bandwidth_gbs=device["bandwidth_gbs"])
    derive(rows, device, kept)
    rows = kept + combine_passes(rows)
    # `date` and `total_s` are this run's; `row_dates`, the ends of the runs the rows are from.
    meta = {"suite": args.suite, "machine": name, "date": date,
            "row_dates": sorted({r["date"] for r in rows}), "device": device,
            "device_start_end": measured,
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "total_s": time.perf_counter() - t0}
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    stem.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    table = markdown(rows, meta)
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"), f"{args.suite} suite, {name}, {date[:10]}")
    progress.unlink()
    print(table)
    print(f"wrote {stem}.json, .md, .png, .log")


if __name__ == "__main__":
    main()
