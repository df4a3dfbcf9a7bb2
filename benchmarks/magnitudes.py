"""Is an SAE's error in which latents fire, or in how large their codes are?

For SAEs that ``quality.py --keep`` saved, prints one JSON line each with, on the held-out rows of the set:

* ``fvu``, ``l0``: the SAE as saved;
* ``oracle_fvu``: each row reconstructed from the latents the SAE fires on it, with the magnitudes that minimise
  that row's squared error (least squares over the active decoder rows, b_d and the SAE's other terms kept);
* ``refit_fvu``: the codes as they are, decoder (W_d, b_d) refitted by least squares on ``--fit-rows`` training rows.

A low ``oracle_fvu`` with a high ``fvu`` means good supports coded at the wrong size (an L1 penalty's shrinkage):

    python benchmarks/quality.py --sets stories --arch relu --set target_l0=32 --keep runs/relu
    python benchmarks/quality.py --sets stories --k 35 --keep runs/topk35
    python benchmarks/magnitudes.py runs/relu/stories runs/topk35/stories --set stories
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data as qd  # noqa: E402

from saeforge.errors import SaeforgeError  # noqa: E402
from saeforge.sae.base import SAE  # noqa: E402


def _fvu(held: torch.Tensor, reconstruct, chunk: int) -> float:
    """‖x − x̂‖² / ‖x − mean x‖² over the held-out rows, as ``quality_data.heldout_metrics`` counts it."""
    var = (held - held.mean(0)).pow(2).sum().item()
    err = sum((x.double() - reconstruct(x)).pow(2).sum().item() for x in held.split(chunk))
    return err / var


@torch.no_grad()
def oracle_fvu(sae: SAE, held: torch.Tensor, chunk: int = 2048) -> float:
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x).float()
        at_zero = sae.decode(torch.zeros_like(f)).float()  # b_d and anything else the decoder adds at f = 0
        width = max(int((f != 0).sum(1).max()), 1)
        idx = f.abs().topk(width, dim=1).indices
        active = (f.gather(1, idx) != 0).float().unsqueeze(-1)
        A = sae.W_dec.float()[idx] * active  # rows x width x d; the slots of inactive latents zeroed
        gram = A @ A.transpose(1, 2) + 1e-6 * torch.eye(width)  # the ridge only pins the zeroed slots
        c = torch.linalg.solve(gram, A @ (x - at_zero).unsqueeze(-1))
        return (at_zero + (c.transpose(1, 2) @ A).squeeze(1)).double()

    return _fvu(held, reconstruct, chunk)


@torch.no_grad()
def refit_fvu(sae: SAE, train: torch.Tensor, held: torch.Tensor, chunk: int = 8192) -> float:
    m = sae.W_dec.shape[0]

    def design(x: torch.Tensor) -> torch.Tensor:  # the codes and a constant column (for b_d)
        f = sae.encode(x).double()
        return torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1)

    gram = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    cross = torch.zeros(m + 1, train.shape[1], dtype=torch.float64)
    for x in train.split(chunk):
        f1 = design(x)
        gram += f1.T @ f1
        cross += f1.T @ x.double()
    B = torch.linalg.solve(gram + 1e-6 * torch.eye(m + 1, dtype=torch.float64), cross)
    return _fvu(held, lambda x: design(x) @ B, chunk)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("saes", nargs="+", type=Path, help="saved SAE folders")
    ap.add_argument("--set", default="stories", choices=qd.SETS, help="the quality set the SAEs were trained on")
    ap.add_argument("--data", type=Path, default=qd.REPO / "runs" / "quality_data")
    ap.add_argument("--fit-rows", type=int, default=1_000_000, help="training rows for the decoder refit")
    args = ap.parse_args(argv)
    train, held = qd.load(args.set, args.data)
    if train is None:  # the toy set is generated, not stored
        train = qd.toy_rows(args.fit_rows, torch.Generator().manual_seed(777), qd.toy_directions())  # not the held-out seed
    train, held = train[:args.fit_rows].float(), held.float()
    for path in args.saes:
        try:
            sae = SAE.load(path)
        except SaeforgeError as e:  # a missing, partial or corrupt folder: one line, not a traceback
            sys.exit(f"magnitudes.py: {path}: {e}")
        sae.eval()
        rec = {"sae": str(path), **{k: round(v, 5) for k, v in qd.heldout_metrics(sae.encode, sae.decode, held).items()}}
        rec["oracle_fvu"] = round(oracle_fvu(sae, held), 5)
        rec["refit_fvu"] = round(refit_fvu(sae, train, held), 5)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
