#!/usr/bin/env python
"""One peer library trains a TopK SAE on ``quality_data``'s batches at its own defaults; prints one JSON line.

Run by ``quality.py --peers`` (one subprocess per library, with an interpreter that has the libraries:
``pip install 'saeforge[bench]'``). Each library gets exactly the batches saeforge gets, in the same order,
and only what its own documentation sets for a TopK SAE of this size; everything else is its default:

* SAELens (``sae-lens``): ``TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))`` trained by its
  ``SAETrainer`` with ``SAETrainerConfig``'s defaults (Adam 3e-4, constant schedule, AuxK 1/32);
* sparsify (``eai-sparsify``): ``SparseCoder`` with its trainer's default optimizer (signum: SignSGD under a
  schedule-free wrapper, momentum 0.95, lr 5e-3/√(n/2¹⁴)), b_dec set to the first batch's mean and the
  decoder kept at unit norm with the parallel gradient removed, as ``sparsify.Trainer`` does; evaluated
  with the wrapper's averaged weights (``optimizer.eval()``, as its checkpoints are written);
* dictionary_learning (``dictionary-learning``): ``TopKTrainer`` (Gao et al.'s recipe, lr 2e-4/√(n/2¹⁴),
  AuxK) driven step by step exactly as its ``trainSAE`` loop does; its 1000 warm-up steps must be fewer
  than the run's steps (it asserts so), so runs shorter than 10,000 steps warm up over a tenth of them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality_data as qd  # noqa: E402


def train_saelens(batches, d, m, k, steps, batch):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k))
    # LanguageModelSAERunnerConfig's defaults, as its to_sae_trainer_config() hands them on (lr_end = lr / 10)
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr_end=3e-4 / 10)
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches)).fit()
    sae.eval()
    return sae.encode, sae.decode, sae.W_dec.detach()


def train_sparsify(batches, d, m, k, steps, batch):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k))
    lr = 5e-3 / math.sqrt(m / 2**14)  # sparsify.Trainer's default for its default optimizer ("signum")
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    for step, x in enumerate(batches):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)  # auxk_alpha defaults to 0 in sparsify's TrainConfig
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()  # the averaged weights, as sparsify saves them

    def encode(x):
        enc = sae.encode(x)
        return torch.zeros(x.shape[0], m).scatter_(-1, enc.top_indices, enc.top_acts)

    return encode, lambda f: f @ sae.W_dec + sae.b_dec, sae.W_dec.detach()


def train_dictionary_learning(batches, d, m, k, steps, batch):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    # its default warmup_steps=1000 must be < steps (an assertion): shorter runs warm up over a tenth
    trainer = TopKTrainer(steps=steps, activation_dim=d, dict_size=m, k=k, layer=0, lm_name="quality",
                          dict_class=AutoEncoderTopK, device="cpu", seed=0, warmup_steps=min(1000, steps // 10))
    for step, x in enumerate(batches):
        trainer.update(step, x)
    ae = trainer.ae.eval()
    return ae.encode, ae.decode, ae.decoder.weight.detach().T


LIBS = {"saelens": train_saelens, "sparsify": train_sparsify, "dictionary_learning": train_dictionary_learning}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", choices=sorted(LIBS), required=True)
    ap.add_argument("--set", choices=qd.SETS, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--width-mult", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, required=True)
    args = ap.parse_args()
    train, held = qd.load(args.set, args.data)
    d = qd.D[args.set]
    m = args.width_mult * d
    steps = math.ceil(args.tokens / args.batch)
    batches = qd.batches(args.set, train, args.batch, args.tokens, args.seed)  # lazily, as saeforge's stream
    t0 = time.perf_counter()
    encode, decode, W_dec = LIBS[args.lib](batches, d, m, args.k, steps, args.batch)
    secs = time.perf_counter() - t0
    rec = {"lib": args.lib, "set": args.set, "tokens": steps * args.batch, "d_in": d, "d_sae": m, "k": args.k}
    rec.update({k: round(v, 5) for k, v in qd.heldout_metrics(encode, decode, held).items()})
    if args.set == "toy":
        rec["recovered"] = round(qd.recovered(qd.toy_directions(), W_dec), 4)
    rec["tokens_per_s"] = round(steps * args.batch / secs, 1)
    rec["threads"] = torch.get_num_threads()
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
