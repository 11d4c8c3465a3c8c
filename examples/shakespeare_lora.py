"""Federated fine-tuning of a pretrained causal transformer on Shakespeare by speaking role:
every parameter (FedAvg) against LoRA adapters only (`trainable="lora"`, Hu et al. 2021).

    .venv/bin/python examples/shakespeare_lora.py [--rounds 30] [--rank 4]

Half the roles (a seeded draw) pretrain the base centrally (Adam on their pooled rows); the
other half federate: the same rounds, cohort, batching and optimizers for (a) full fine-tuning
and (b) the adapters of a `causal_transformer(lora_rank=r)` loaded with the base
(`fs.filters.with_base`). Each is scored on the held-out speeches of the federated roles
(next-character accuracy, PAD excluded: the per-role distribution by `fs.evaluate`, and pooled),
beside the base before fine-tuning. Reported per method: trained parameters and their
fraction, bytes per client upload, the chunk size K the automatic search chose (or found in
the cache of earlier runs' choices), XLA's temporary memory of the round program at that K,
and seconds per round. Writes docs/shakespeare_lora.json. The defaults (a 117k-parameter
transformer, 600 pretraining steps, 30 rounds of 10 roles) take about 4 minutes on a 2-core
CPU, the chunk-size searches a minute of it.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

import fedjax_sim as fs


def pretrain(model, rows, *, steps, batch_size, lr, seed):
    """Central Adam on random batches of `rows`; the base's params."""
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(lambda p: model.loss(p, batch, key).mean())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.key(seed))
    opt_state, rng = optimizer.init(params), np.random.default_rng(seed)
    for s in range(steps):
        pick = rng.integers(0, len(rows["x"]), batch_size)
        params, opt_state, loss = step(params, opt_state, {k: v[pick] for k, v in rows.items()},
                                       jax.random.key(s))
        if (s + 1) % max(1, steps // 4) == 0:
            print(f"  pretraining step {s + 1}: loss {float(loss):.3f}")
    return params


def scores(model, params, test):
    per_role = fs.evaluate(model, params, test).summary["accuracy"]
    return {"per_role": per_role,
            "pooled": fs.evaluate_pooled(model, params, test)["accuracy"]}


def federate(name, algo, params, train, test, args):
    """Fine-tunes from `params`; the run's sizes, chunk size, timings and test scores."""
    print(f"{name}: searching the chunk size and running {args.rounds} rounds")
    sim = fs.Simulation(algo, train, cohort_size=args.cohort, seed=args.seed, params=params,
                        chunk_size=None, progress=False)
    memory = sim.memory_analysis()  # compiles the round program unless the search did
    result = sim.run(args.rounds)
    trained = algo.trained or fs.filters.trained_fraction(
        params, jax.tree.map(lambda _: True, params))  # all leaves: full fine-tuning
    return {
        "trained_params": trained.params, "fraction": trained.fraction,
        "upload_bytes": trained.bytes, "total_params": trained.total_params,
        "chunk_size": result.chunk_size, "chunk_size_source": result.chunk_size_source,
        "round_temp_bytes": None if memory is None else memory.temp_size_in_bytes,
        "chunk_size_choice_s": result.timings.get("chunk_size_choice_s", 0.0),
        "seconds_per_round": result.timings["rounds_s"] / args.rounds,
        "train_loss_first_last": [result.history[0]["train_loss"],
                                  result.history[-1]["train_loss"]],
        "accuracy": scores(algo.model, result.params, test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA's alpha; default rank")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--client-lr", type=float, default=3e-3, help="client Adam")
    parser.add_argument("--server-lr", type=float, default=1.0, help="server SGD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/shakespeare_lora.json")
    args = parser.parse_args()

    train, test = fs.data.shakespeare(args.path)
    roles = np.random.default_rng(args.seed).permutation(train.num_clients)
    pre, fed = np.sort(roles[: len(roles) // 2]), np.sort(roles[len(roles) // 2:])
    fed_train = train.subset(fed)
    # The federated roles' held-out speeches (a role with one speech has none).
    fed_test = test.subset(np.flatnonzero(np.isin(test.client_ids, fed_train.client_ids)))
    print(f"pretraining roles: {len(pre)}; federated roles: {fed_train}\ntest: {fed_test}")

    shape = dict(max_len=train.features["x"].shape[1], d_model=args.d_model,
                 num_heads=args.heads, num_layers=args.layers)
    base_model = fs.models.causal_transformer(**shape)
    lora_model = fs.models.causal_transformer(**shape, lora_rank=args.rank,
                                              lora_alpha=args.alpha)
    t = time.perf_counter()
    base = pretrain(base_model, train.subset(pre).pooled(), steps=args.pretrain_steps,
                    batch_size=args.pretrain_batch, lr=args.pretrain_lr, seed=args.seed)
    results = {"config": vars(args), "pretrain_s": time.perf_counter() - t,
               "base": {"accuracy": scores(base_model, base, fed_test)}}

    # The same local work and optimizers for both; only what trains (and is sent) differs.
    local = dict(batch_size=args.batch_size, num_epochs=1, max_steps=args.max_steps)
    full = fs.algorithms.fedavg(base_model, optax.adam(args.client_lr),
                                optax.sgd(args.server_lr), **local)
    lora = fs.algorithms.fedavg(lora_model, optax.adam(args.client_lr),
                                optax.sgd(args.server_lr), trainable="lora", **local)
    results["full"] = federate("full fine-tuning", full, base, fed_train, fed_test, args)
    results["lora"] = federate(f"LoRA rank {args.rank}", lora, fs.filters.with_base(
        lora_model.init(jax.random.key(args.seed + 1)), base), fed_train, fed_test, args)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'':18}{'trained':>9}{'fraction':>10}{'upload':>10}{'K':>4}{'temp MB':>9}"
          f"{'s/round':>9}{'acc mean':>10}{'p10':>7}{'p90':>7}{'pooled':>8}")
    for name, key in (("base (no tuning)", "base"), ("full fine-tuning", "full"),
                      (f"LoRA rank {args.rank}", "lora")):
        r, acc = results[key], results[key]["accuracy"]
        sizes = (f"{r['trained_params']:>9,}{r['fraction']:>10.3f}"
                 f"{r['upload_bytes'] / 1024:>8.0f}KB{r['chunk_size']:>4}"
                 f"{(r['round_temp_bytes'] or 0) / 2**20:>9.1f}{r['seconds_per_round']:>9.2f}"
                 if key != "base" else " " * 59)
        print(f"{name:18}{sizes}{acc['per_role']['mean']:>10.3f}{acc['per_role']['p10']:>7.3f}"
              f"{acc['per_role']['p90']:>7.3f}{acc['pooled']:>8.3f}")
    print(f"(K from {results['full']['chunk_size_source']} / "
          f"{results['lora']['chunk_size_source']}; wrote {args.out})")


if __name__ == "__main__":
    main()
