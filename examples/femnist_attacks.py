"""Attacks against defences on FEMNIST-105: main-task accuracy and attack success after R rounds
of FedAvg, for every attack x defence at 10% and 30% malicious clients.

    .venv/bin/python examples/femnist_attacks.py [--rounds 30] [--quick]

FedAvg (MLP 784-200-62, 20 writers a round with exactly round(f x 20) malicious, one local
epoch of batches of 20, client SGD 0.05, server SGD 1.0, uniform weights). The attacks:
  sign_flip   malicious clients send minus their honest update
  scaling     the backdoor below, its update boosted 20x (model replacement: n / eta)
  gaussian    N(0, 0.5^2) per coordinate in place of the update
  label_flip  every label l of a malicious writer becomes 61 - l
  backdoor    a 4x4 white square in the corner, relabelled 0, on half a malicious writer's
              examples
  alie        "a little is enough": mu - z_max sigma of the benign updates (z_max 0.13 for
              2 of 20 malicious, 0.67 for 6 of 20)
  alie_z1.5   the same with z = 1.5
Attack success: for the backdoor (and scaling), the share of triggered test images of
another class classified 0; for label flipping, the share of test images put in class
61 - l; untargeted attacks have none (their effect is the accuracy).
Writes docs/femnist_attacks.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import attacks as at

A = fs.aggregators
DOCS = Path(__file__).resolve().parents[1] / "docs"
ATTACKS = ["none", "sign_flip", "scaling", "gaussian", "label_flip", "backdoor", "alie",
           "alie_z1.5"]


def defences(cohort: int, malicious: int) -> dict:
    """Each defence as (per-client stages, reduction), sized for the round's malicious count
    (Krum's f, the trimmed fraction) as their papers assume the defender knows it. The norm
    bound and the clipping radius are 0.3, about the honest updates' median norm (0.24-0.29
    in the first rounds)."""
    f = max(malicious, 1)
    robust = fs.robust
    return {
        "mean": ((), A.mean()),
        "median": ((), robust.median()),
        "trimmed_mean": ((), robust.trimmed_mean(min(0.45, f / cohort + 0.05))),
        "krum": ((), robust.krum(f)),
        "multi_krum": ((), robust.multi_krum(f, cohort - f)),
        "geometric_median": ((), robust.geometric_median()),
        "norm_bound": ((robust.norm_bound(0.3),), A.mean()),
        "centered_clipping": ((), robust.centered_clipping(0.3)),
    }


def run_cell(attack, defence, fraction, args, train, test, model, door, flip):
    cohort = args.cohort
    m = 0 if attack == "none" else round(fraction * cohort)
    adversary = at.Adversary.choose(train.num_clients, fraction, seed=args.seed)
    per_client, reduction = defences(cohort, m)[defence]
    first = {"sign_flip": (at.sign_flip(adversary),),
             "scaling": (at.scaling(adversary, float(cohort)),),
             "gaussian": (at.gaussian(adversary, 0.5),)}.get(attack, ())
    if attack.startswith("alie"):
        reduction = at.alie(adversary, reduction, z=None if attack == "alie" else 1.5)
    chain = A.chain(*first, A.mask_nonfinite(), A.weight_by("uniform"), *per_client, reduction)
    data_attack = {"scaling": door, "backdoor": door, "label_flip": flip}.get(attack)
    data = train if data_attack is None else at.poison(train, adversary, data_attack,
                                                         seed=args.seed)
    extra = {} if data_attack is None else {"attack_success": data_attack.success_data(test)}
    algo = fs.algorithms.fedavg(model, optax.sgd(args.client_lr), aggregator=chain,
                                batch_size=20, num_epochs=1)
    result = fs.simulate(algo, data, rounds=args.rounds, sampler=adversary.sampler(cohort, m),
                         seed=args.seed, eval_data=test, eval_extra=extra, chunk_size=5,
                         progress=False)
    last = result.history[-1]
    return {"accuracy": last["eval"]["accuracy"]["weighted_mean"],
            "success": last.get("attack_success", {}).get("accuracy"),
            "malicious_per_round": m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, mean and median, three attacks (a smoke test)")
    parser.add_argument("--out", default=str(DOCS / "femnist_attacks"))
    parser.add_argument("--only", nargs="+", choices=ATTACKS, default=None,
                        help="run these attacks alone, their cells replacing theirs in --out's "
                        "JSON (the rest kept)")
    parser.add_argument("--from-json", action="store_true",
                        help="no training: the table and plot again from --out's JSON")
    args = parser.parse_args()
    if args.from_json:
        return write(Path(args.out), **json.loads(Path(args.out).with_suffix(".json")
                                                  .read_text()))
    # The health monitor names the boosted and noised clients every round: expected here.
    warnings.filterwarnings("ignore", message=".*sent an update of norm")
    train, test = fs.data.femnist(args.path)
    flat = lambda f: {**f, "x": f["x"].reshape(len(f["x"]), -1)}
    train, test = train.map(flat), test.map(flat)
    model = fs.models.mlp(784, 62, hidden=(200,))
    door, flip = at.backdoor(0, 62, image_shape=(28, 28)), at.label_flip(62)
    attacks, names, fractions = ATTACKS, list(defences(args.cohort, 1)), (0.1, 0.3)
    if args.quick:
        args.rounds, attacks, names = 3, ["none", "scaling", "alie"], ["mean", "median"]
    cells, out = [], Path(args.out)
    if args.only:
        kept = json.loads(out.with_suffix(".json").read_text())["cells"]
        cells = [c for c in kept if c["attack"] not in args.only]
        attacks = list(args.only)
    for fraction in fractions:
        for attack in attacks:
            if attack == "none" and fraction != fractions[0]:
                continue
            for defence in names:
                t = time.perf_counter()
                cell = run_cell(attack, defence, fraction, args, train, test, model, door, flip)
                cell.update(attack=attack, defence=defence,
                            fraction=0.0 if attack == "none" else fraction,
                            seconds=time.perf_counter() - t)
                cells.append(cell)
                success = "" if cell["success"] is None else f"  success {cell['success']:.3f}"
                print(f"{cell['fraction']:.0%} {attack:10s} {defence:18s} "
                      f"acc {cell['accuracy']:.3f}{success}  ({cell['seconds']:.0f} s)",
                      flush=True)
                # Written after every cell, so a long grid stopped early keeps what it has.
                meta = {"rounds": args.rounds, "cohort": args.cohort,
                        "client_lr": args.client_lr, "seed": args.seed,
                        "model": "MLP 784-200-62",
                        "seconds": sum(c["seconds"] for c in cells)}
                out.with_suffix(".json").write_text(json.dumps({"setup": meta, "cells": cells},
                                                               indent=1))
    write(out, meta, cells)


def write(out: Path, setup: dict, cells: list) -> None:
    """The table and the plot of `cells`, their rows, columns and fractions as they ran."""
    order = lambda key: list(dict.fromkeys(c[key] for c in cells))
    names = order("defence")
    attacks = [a for a in ATTACKS if a in order("attack")]
    fractions = tuple(f for f in order("fraction") if f > 0)
    out.with_suffix(".md").write_text(table(cells, names, attacks, fractions, setup))
    plot(cells, names, attacks, fractions, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png")


def table(cells, names, attacks, fractions, meta) -> str:
    find = {(c["attack"], c["defence"], c["fraction"]): c for c in cells}
    lines = [f"FEMNIST-105, {meta['rounds']} rounds of {meta['cohort']} writers, "
             f"{meta['model']}: test accuracy / attack success (targeted attacks)\n"]
    for fraction in fractions:
        lines += [f"\n**{fraction:.0%} malicious**\n", "| attack | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for attack in attacks:
            f = 0.0 if attack == "none" else fraction
            row = []
            for d in names:
                c = find.get((attack, d, f))
                row.append("" if c is None else f"{c['accuracy']:.3f}" + (
                    "" if c["success"] is None else f" / {c['success']:.3f}"))
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
    lines += ["", "**The literature's qualitative results, checked on these cells** "
              "(broken: backdoor success >= 0.5; robust: success <= 0.2; hurt: accuracy "
              "0.05 or more below the same defence without attack)", ""]
    lines += [f"- {claim}" for claim in literature_checks(find, fractions)]
    return "\n".join(lines) + "\n"


def literature_checks(find, fractions) -> list[str]:
    """Mean broken by scaling (Bagdasaryan et al. 2020), median and Krum robust to it (Yin et
    al. 2018; Blanchard et al. 2017), "a little is enough" hurting both (Baruch et al.
    2019): whether each shows, with the numbers, so a rerun states its own result."""
    def cell(attack, defence, f):
        return find.get((attack, defence, 0.0 if attack == "none" else f))

    out = []
    for f in fractions:
        mean = cell("scaling", "mean", f)
        if mean is not None:
            out.append(f"{f:.0%}: scaling breaks the mean: "
                       f"{'yes' if mean['success'] >= 0.5 else 'no'} (success "
                       f"{mean['success']:.2f})")
        for d in ("median", "krum"):
            c = cell("scaling", d, f)
            if c is not None:
                out.append(f"{f:.0%}: {d} robust to scaling: "
                           f"{'yes' if c['success'] <= 0.2 else 'no'} (success "
                           f"{c['success']:.2f})")
            for alie in ("alie", "alie_z1.5"):
                a, base = cell(alie, d, f), cell("none", d, f)
                if a is not None and base is not None:
                    drop = base["accuracy"] - a["accuracy"]
                    out.append(f"{f:.0%}: {alie} hurts {d}: {'yes' if drop >= 0.05 else 'no'} "
                               f"(accuracy {base['accuracy']:.3f} -> {a['accuracy']:.3f})")
    return out


def plot(cells, names, attacks, fractions, path) -> None:
    """Heat maps: accuracy (colours spread over 0 to the best cell, as the cells differ by
    a few points) for every attack, success for the targeted ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    find = {(c["attack"], c["defence"], c["fraction"]): c for c in cells}
    targeted = [a for a in attacks if any(c["attack"] == a and c["success"] is not None
                                          for c in cells)]
    best = max(c["accuracy"] for c in cells)
    fig, axes = plt.subplots(2, len(fractions), figsize=(6 * len(fractions), 8.5),
                             squeeze=False, height_ratios=[len(attacks), max(len(targeted), 1)])
    for j, fraction in enumerate(fractions):
        for i, (key, title, rows, vmax, cmap) in enumerate((
                ("accuracy", "test accuracy", attacks, best, "viridis"),
                ("success", "attack success", targeted, 1.0, "magma_r"))):
            grid = np.full((max(len(rows), 1), len(names)), np.nan)
            for a, attack in enumerate(rows):
                for d, name in enumerate(names):
                    c = find.get((attack, name, 0.0 if attack == "none" else fraction))
                    if c is not None and c[key] is not None:
                        grid[a, d] = c[key]
            ax = axes[i, j]
            im = ax.imshow(grid, vmin=0, vmax=vmax, cmap=cmap, aspect="auto")
            for (a, d), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    dark = (v < 0.5 * vmax) == (key == "accuracy")
                    ax.text(d, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_title(f"{title}, {fraction:.0%} malicious", fontsize=10)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("FedAvg on FEMNIST-105 under attack (none: no malicious client)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
