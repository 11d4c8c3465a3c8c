"""Seeds as mean and band: a sweep of FedAvg's client learning rate, then `fedjax-sim plot`.

    .venv/bin/python examples/plot_seeds.py [--rounds 40] [--out docs/] [--overwrite]

Runs examples/configs/plot_seeds.toml with `fedjax_sim.experiment.sweep`, exactly what
`fedjax-sim sweep examples/configs/plot_seeds.toml` does: FedAvg on Synthetic(1,1) (300
clients, cohort 30, batch 10, one epoch), client SGD at 0.01 and 0.05, three seeds each, the
six runs as one vmapped program; every 4 rounds all 300 test clients are evaluated with the
global model. The sweep directory (runs/plot_seeds, or the next free runs/plot_seeds-N) holds
sweep.json and a directory per run; `fs.plots.plot_runs` (`fedjax-sim plot`) groups the runs
that differ only in seed and draws each group's mean and 95% band, and the per-client
accuracy quantiles, into its plots/ folder (png and svg). The curves and the per-client
quantile bands are copied to `--out` as plots_seeds_curves.png and plots_seeds_clients.png.
"""

import argparse
import shutil
from pathlib import Path

import fedjax_sim as fs
from fedjax_sim import config as C
from fedjax_sim import experiment

CONFIG = Path(__file__).parent / "configs" / "plot_seeds.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="run.rounds (default 40)")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--overwrite", action="store_true",
                        help="reuse runs/plot_seeds instead of the next free runs/plot_seeds-N")
    args = parser.parse_args()
    overrides = [] if args.rounds is None else [f"run.rounds={args.rounds}"]
    cfg = C.load(CONFIG, overrides=overrides)
    outcome = experiment.sweep(cfg, overwrite=args.overwrite, progress=False)
    for run, history in zip(outcome.result.runs, outcome.result.histories, strict=True):
        final = history[-1]
        print(f"{run.name}: train loss {final['train_loss']:.3f}, test accuracy "
              f"{final['eval']['accuracy']['weighted_mean']:.3f} (median client "
              f"{final['eval']['accuracy']['p50']:.3f})")
    plots = outcome.output_dir / "plots"
    written = fs.plots.plot_runs([outcome.output_dir], plots, formats=("png", "svg"))
    print("\n".join(map(str, written)))
    docs = Path(args.out)
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(plots / "curves.png", docs / "plots_seeds_curves.png")
    shutil.copy(plots / "clients_accuracy.png", docs / "plots_seeds_clients.png")


if __name__ == "__main__":
    main()
