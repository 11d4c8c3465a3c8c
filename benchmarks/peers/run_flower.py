"""Flower simulation (Ray backend) with PyTorch on one benchmark workload (run in
benchmarks/peers/.venv-flower): prints one RESULT line (see ../workloads.py).

  .venv-flower/bin/python run_flower.py --workload W1 --cohort 100 [--cpus-per-client 1]

Flower's public Message API: a `ClientApp` whose train function trains the torch model on
its node's partition (local SGD, one epoch, data shuffled per round) and replies with the
weights and `num-examples`; a `ServerApp` running the `FedAvg` strategy (the example-weighted
mean of the returned weights, i.e. FedAvg with server SGD at learning rate 1.0, the workload's
setting) over `cohort` virtual SuperNodes, all trained every round, run by
`flwr.simulation.run_simulation` on Ray with `--cpus-per-client` CPUs per client actor (one
torch thread each). Round times are taken by the strategy's `evaluate_fn`, which Flower calls
before the first round and after every round.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flwr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_models  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from workloads import SEED, WORKLOADS, client_data, driver_parser, result_line, split_clients  # noqa: E402

_CACHE = {}


def node_data(workload: str, cohort: int, node: int):
    """This node's examples (each Ray actor generates the population once and keeps it)."""
    key = (workload, cohort)
    if key not in _CACHE:
        w = WORKLOADS[workload]
        _CACHE[key] = split_clients(w, *client_data(w, cohort))
    x, y = _CACHE[key][node]
    return torch.from_numpy(x), torch.from_numpy(y)


def make_apps(workload: str, cohort: int, rounds: int, ticks: list, checks: dict):
    w = WORKLOADS[workload]
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        node = int(context.node_config["partition-id"])
        x, y = node_data(workload, cohort, node)
        model = torch_models.build(w)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.SGD(params, lr=w.client_lr)
        rng = np.random.default_rng([SEED, node, int(msg.content["config"]["server-round"])])
        for _ in range(w.epochs):
            order = torch.from_numpy(rng.permutation(len(y)))
            for s in range(0, len(y), w.batch_size):
                idx = order[s:s + w.batch_size]
                opt.zero_grad()
                model.loss(x[idx], y[idx]).backward()
                opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y)})}),
                       reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(SEED)
        model = torch_models.build(w)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cohort,
                          min_available_nodes=cohort)

        def clock(server_round, arrays):
            ticks.append(time.perf_counter())
            weights = arrays.to_torch_state_dict()
            assert all(torch.isfinite(v).all() for v in weights.values()), "Flower diverged"

        start = ArrayRecord(model.state_dict())
        result = strategy.start(grid=grid, initial_arrays=start, num_rounds=rounds,
                                evaluate_fn=clock)
        # Flower logs a failing ClientApp and goes on without it: make sure every round had
        # all its replies and the model moved.
        final = result.arrays.to_torch_state_dict()
        moved = max(float((final[k] - v).abs().max())
                    for k, v in start.to_torch_state_dict().items())
        checks["moved"] = moved
        checks["rounds_with_results"] = len(result.train_metrics_clientapp)

    return server_app, client_app


def main(argv=None) -> None:
    p = driver_parser(__doc__.split("\n")[0], own_loop=False)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    args = p.parse_args(argv)
    ticks: list[float] = []
    checks: dict = {}
    rounds = 1 + args.rounds
    server_app, client_app = make_apps(args.workload, args.cohort, rounds, ticks, checks)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.cohort,
                   backend_config={"client_resources": {"num_cpus": args.cpus_per_client,
                                                        "num_gpus": 0.0}})
    # Flower logs a failing ClientApp and goes on without it: check that every round had
    # client results and that the model moved.
    assert checks.get("moved", 0) > 0, "the model did not change: see the ClientApp errors"
    assert checks["rounds_with_results"] == rounds, checks
    times = np.diff(ticks).tolist()
    assert len(times) == rounds, (len(times), rounds)
    timed = times[1:]
    result_line({"system": "flower", "workload": args.workload, "cohort": args.cohort,
                 "first_round_s": times[0], "round_s": timed,
                 "s_per_round": float(np.median(timed)), "s_per_round_min": min(timed),
                 "compile_s": None, "cpus_per_client": args.cpus_per_client,
                 "version": flwr.__version__, "torch_version": torch.__version__,
                 "peak_mem_note": "driver process only; Ray actor processes not counted"})


if __name__ == "__main__":
    main()
