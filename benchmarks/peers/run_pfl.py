"""pfl 0.6 (Apple pfl-research) with PyTorch on one benchmark workload (run in
benchmarks/peers/.venv-pfl): prints one RESULT line (see ../workloads.py).

  .venv-pfl/bin/python run_pfl.py --workload W1 --cohort 100 [--threads 1]

pfl's public API as its tutorials use it: `FederatedDataset.from_slices` with a
`minimize_reuse` user sampler, a `PyTorchModel` (local SGD created per user, central SGD),
`FederatedAveraging().run(...)` on a `SimulatedBackend`, single process. Round times are taken
by a callback after every central iteration. Torch runs with `--threads` intra-op threads
(default 1: pfl's own guidance is one worker process per core with one thread each).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pfl  # noqa: E402
import torch  # noqa: E402
import torch_models  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402
from workloads import SEED, WORKLOADS, client_data, driver_parser, result_line, split_clients  # noqa: E402


class RoundClock(TrainingProcessCallback):
    """Wall time at the start of training and after every central iteration."""

    def __init__(self):
        self.ticks = []

    def on_train_begin(self, *, model):
        self.ticks.append(time.perf_counter())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.ticks.append(time.perf_counter())
        return False, Metrics()


def main(argv=None) -> None:
    p = driver_parser(__doc__.split("\n")[0], own_loop=False)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 (pfl draws from the global generator)
    w = WORKLOADS[args.workload]
    x, y = client_data(w, args.cohort)
    users = {i: list(pair) for i, pair in enumerate(split_clients(w, x, y))}
    data = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse",
                                                                list(users)))
    net = torch_models.build(w)
    model = PyTorchModel(
        net, local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(
            [q for q in net.parameters() if q.requires_grad], lr=w.server_lr))
    clock = RoundClock()
    rounds = 1 + args.rounds
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds,
                                           evaluation_frequency=rounds + 1,
                                           train_cohort_size=args.cohort, val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=w.epochs,
                                              local_learning_rate=w.client_lr,
                                              local_batch_size=w.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=w.batch_size),
        callbacks=[clock])
    times = np.diff(clock.ticks).tolist()
    assert len(times) == rounds, (len(times), rounds)
    assert all(torch.isfinite(q).all() for q in net.parameters()), "pfl diverged"
    timed = times[1:]
    result_line({"system": "pfl", "workload": w.name, "cohort": args.cohort,
                 "first_round_s": times[0], "round_s": timed,
                 "s_per_round": float(np.median(timed)), "s_per_round_min": min(timed),
                 "compile_s": None, "threads": args.threads,
                 "version": pfl.__version__ if hasattr(pfl, "__version__") else "0.6",
                 "torch_version": torch.__version__})


if __name__ == "__main__":
    main()
