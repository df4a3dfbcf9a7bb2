"""Evaluation orchestration: stream held-out text through the model, accumulate every metric, resume.

Two passes over the same packed contexts (``saeforge.activations.cache.context_batches``):

1. ``recon`` -- capture the SAEs' hooks (the forward stops right after the last one), encode/decode the kept
   rows, accumulate reconstruction sums, per-latent counts and a token sample for activation quantiles; the
   target means it yields are the mean-ablation values of pass 2;
2. ``downstream`` -- causal LMs only: clean, spliced, zero- and mean-ablated forward passes (see
   ``downstream.py``).

Several SAEs are evaluated together: one capture serves all of them in pass 1, one clean forward (and one
pair of ablations per hook) serves all of them in pass 2.

Resuming. Batches are grouped into chunks of ``chunk_batches``. After each chunk the chunk's append-only data
(the quantile sample, per-token losses) is written to ``OUT/eval_chunks/<pass>_<chunk>.npz`` and *then* the
running sums go to ``OUT/eval_state.json`` (both atomically), so the state file is the commit point: a
resumed run reloads the sums bit-exactly (arrays are stored as base64 of their raw bytes), skips the chunks
it lists as done and ends with the same numbers as an uninterrupted run.

Under ``torchrun`` the chunks are dealt round-robin over the processes (process ``r`` of ``W`` runs chunks
``c ≡ r (mod W)``); at the end of each pass the processes exchange their sums and every one merges them in
rank order (:meth:`ReconStats.merge` and friends: sums, counts, maxima and the pairwise mean/M2 update), so
the metrics are those of all the tokens, equal to a one-process run up to the summation order of floats.
The chunk files carry the token sample and per-token losses for the final pass over them; rank 0 writes the
results. A distributed evaluation restarts from the beginning rather than resuming mid-pass.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from saeforge import distributed as dist
from saeforge.config import JsonConfig
from saeforge.data.batches import context_batches
from saeforge.data.packing import ContextBatch
from saeforge.errors import CorruptFileError, SaeforgeError
from saeforge.eval.downstream import DownstreamStats, SpliceTarget, downstream_batch
from saeforge.eval.features import FeatureStats, feature_summary, sparse_rows
from saeforge.eval.probe_tasks import BUILTIN_TASKS
from saeforge.eval.recon import HookReconStats, ReconStats, encode_decode, rows_per_step
from saeforge.hooks import capture, resolve_hook
from saeforge.io import write_bytes_atomic, write_json_atomic
from saeforge.models import check_context_len
from saeforge.sae.base import SAE, check_finite_weights

STATE = "eval_state.json"
STATE_VERSION = 2  # 2: the state is wrapped as {"sha256", "state"}
# Settings that change which tokens are evaluated or how chunks are cut: a resumed run must match them.
_FINGERPRINT_KEYS = ("n_tokens", "context_len", "batch_contexts", "chunk_batches", "sample_tokens", "splice_all",
                     "text_field", "split", "seed")


# Metrics that are finite for any SAE with finite weights on a model with finite activations; a NaN in them
# means non-finite inputs (ratios such as rel_bias or ce_recovered may be 0/0 for degenerate SAEs, legitimately).
_MUST_BE_FINITE = ("mse", "fvu", "l0", "ce_clean", "ce_spliced", "kl")


EXTRA_SECTIONS = ("probes", "n2g", "ablation")  # the optional sections ``--all`` runs (docs/eval.md)


@dataclass
class EvalConfig(JsonConfig):
    n_tokens: int = 100_000  # kept (non-special) eval tokens
    context_len: int = 128
    batch_contexts: int = 8  # contexts per forward pass
    chunk_batches: int = 16  # batches between resume checkpoints
    dense_threshold: float = 0.1  # a latent firing on more than this fraction of tokens is "dense"
    downstream: bool = True  # spliced-loss pass (causal LMs only)
    splice_all: bool = False  # splice/score BOS and special positions too (default: keep their activation)
    sample_tokens: int = 16384  # tokens sampled for per-latent activation quantiles
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9, 0.99])
    decoder_chunk: int | None = None  # rows per block in the decoder cosine computation (None: auto)
    text_field: str = "text"
    split: str = "train"
    seed: int = 0
    # optional sections (``--all``; docs/eval.md "Optional sections"): which run, and their sizes
    extras: list[str] | None = None  # sections to run among probes, n2g, ablation (None: all installed)
    n2g_latents: int = 64  # latents explained per SAE
    n2g_contexts: int = 384  # contexts read for N2G: the first 2/3 build patterns, the last 1/3 score them
    probe_tasks: list[str] | None = None  # built-in probe tasks by name (None: all; []: none, only the file's)
    probe_task_file: str | None = None  # a JSONL file of user probe tasks (format in docs/eval.md)
    probe_tokens: int | None = None  # text tokens for the built-in probe tasks (None: n_tokens)
    ablation_positions: int = 64  # positions sampled for ablation sparsity
    # HF models: spread the layers over the node's GPUs (e.g. "auto", through accelerate) instead of --device;
    # the SAEs sit on the embedding's device and each hook's rows move there (docs/distributed.md)
    device_map: str | None = None

    FLAGS = {"n_tokens": "--tokens", "batch_contexts": "--batch-size"}  # the others: --<field-name>

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_ints(1, "n2g_latents", "probe_tokens", "ablation_positions")
        self.require(self.n2g_contexts >= 3, "n2g_contexts", ">= 3 (2/3 build the patterns, 1/3 score them)")
        if self.extras is not None:
            bad = sorted(set(self.extras) - set(EXTRA_SECTIONS))
            if bad:
                raise SaeforgeError(f"unknown optional section(s) {bad}; pass --extras as a comma-separated "
                                    f"subset of {', '.join(EXTRA_SECTIONS)}")
        if self.probe_tasks is not None:
            names = [t.name for t in BUILTIN_TASKS]
            bad = [t for t in self.probe_tasks if t not in names]
            if bad:
                raise SaeforgeError(f"unknown probe task(s) {bad}; pass --probe-tasks as a comma-separated "
                                    f"subset of: {', '.join(names)}")
            if not self.probe_tasks and self.probe_task_file is None and (self.extras is None
                                                                           or "probes" in self.extras):
                raise SaeforgeError("--probe-tasks is empty and no --probe-task-file is given; name built-in "
                                    "tasks, pass a task file, or leave probes out with --extras")
        for name in ("n_tokens", "context_len", "batch_contexts", "chunk_batches"):
            if int(getattr(self, name)) < 1:
                raise SaeforgeError(f"eval {name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.dense_threshold <= 1:
            raise SaeforgeError(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")
        if any(not 0 <= q <= 1 for q in self.quantiles):
            raise SaeforgeError(f"quantiles must lie in [0, 1], got {self.quantiles}")


# ---- JSON helpers -----------------------------------------------------------------------------------------
def _pack(obj: Any) -> Any:
    """State -> JSON: numpy arrays become base64 of their raw bytes (bit-exact round trip)."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"__ndarray__": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}
    if isinstance(obj, dict):
        return {str(k): _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unpack(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            raw = base64.b64decode(obj["b64"])
            return np.frombuffer(raw, dtype=obj["__ndarray__"]).reshape(obj["shape"]).copy()
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v) for v in obj]
    return obj


def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())
    return buf.getvalue()


class ChunkStore:
    """Append-only per-chunk arrays, on disk under ``folder`` or in memory when there is no output folder."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.mem: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.sha: dict[str, str] = {}  # file name -> sha256, saved in the eval state and checked on read

    def put(self, phase: str, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        if self.folder is None:
            self.mem[(phase, chunk)] = arrays
        else:
            name = f"{phase}_{chunk:06d}.npz"
            self.sha[name] = hashlib.sha256(save_npz(self.folder / name, arrays)).hexdigest()

    def concat(self, phase: str, n_chunks: int, keys: list[str]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for c in range(n_chunks):
            if self.folder is None:
                z = self.mem[(phase, c)]
            else:
                p = self.folder / f"{phase}_{c:06d}.npz"
                if not p.exists():
                    raise SaeforgeError(f"{p} is missing, so the eval state cannot be resumed; rerun without --resume")
                data = p.read_bytes()
                want = self.sha.get(p.name)
                if want is not None and hashlib.sha256(data).hexdigest() != want:
                    raise CorruptFileError(f"{p} fails its checksum (damaged on disk); rerun without --resume")
                z = dict(np.load(io.BytesIO(data)))
            for k in keys:
                parts[k].append(z[k])
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}

    def clear(self) -> None:
        self.mem.clear()
        self.sha.clear()
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)


def sae_fingerprint(sae: SAE) -> str:
    h = hashlib.sha256()
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- the runner -------------------------------------------------------------------------------------------
class EvalRunner:
    """Evaluate ``saes`` (name -> SAE, all on the same model) on text ``data``; see the module docstring."""

    def __init__(self, saes: Mapping[str, SAE], lm: Any, data: str, cfg: EvalConfig, out: str | Path | None = None):
        if not saes:
            raise SaeforgeError("no SAE to evaluate; pass at least one --sae")
        self.lm, self.data, self.cfg = lm, str(data), cfg
        self.out = Path(out) if out is not None else None
        dev = lm.device

        check_context_len(lm, cfg.context_len)
        for n, s in saes.items():
            check_finite_weights(s.state_dict(), f"SAE {n!r}")
        self.saes = {n: s.to(dev).eval() for n, s in saes.items()}
        self.names = list(self.saes)
        self.targets: list[SpliceTarget] = []
        for name, sae in self.saes.items():
            ins, outs = sae.input_hooks(), sae.output_hooks()
            if not ins or not outs:
                raise SaeforgeError(f"SAE {name!r} names no hook point (cfg.hook is empty); set it, e.g. resid_post.2")
            points = {h: resolve_hook(lm.model, h, lm.family) for h in dict.fromkeys(ins + outs)}
            self.targets.append(SpliceTarget(sae, [points[h] for h in ins], [points[h] for h in outs]))
        self.points = list({hp.name: hp for t in self.targets for hp in t.inputs + t.outputs}.values())
        self.recon = [ReconStats(s.cfg.d_out) for s in self.saes.values()]
        self.recon_hooks = [HookReconStats(s.output_hooks(), [p.shape[-1] for p in s.split_outputs(
            torch.zeros(1, s.cfg.d_out))]) for s in self.saes.values()]
        self.feats = [FeatureStats(s.cfg.d_sae) for s in self.saes.values()]
        self.down = [DownstreamStats() for _ in self.saes]
        self.store = ChunkStore(self.out / "eval_chunks" if self.out else None)
        dist.init(dev)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.per_token: dict[str, dict[str, np.ndarray]] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    @property
    def do_downstream(self) -> bool:
        return bool(self.cfg.downstream and self.lm.is_causal)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": str(self.lm.spec),
            "data": self.data,
            "saes": {n: sae_fingerprint(s) for n, s in self.saes.items()},
            "hooks": {n: [s.cfg.hook, s.cfg.target_hook] for n, s in self.saes.items()},  # --hook overrides
            **{k: getattr(self.cfg, k) for k in _FINGERPRINT_KEYS},
        }

    # ---- state ----------------------------------------------------------------------------------------------
    def _new_state(self, fp: dict[str, Any]) -> dict[str, Any]:
        phase = {"chunks_done": 0, "tokens": 0, "done": False}
        return {"version": STATE_VERSION, "fingerprint": fp, "recon": dict(phase), "downstream": dict(phase),
                "results": None, "extras": {}}

    def load_state(self, resume: bool) -> dict[str, Any]:
        fp = self.fingerprint()
        path = self.out / STATE if self.out else None
        if not resume or path is None or not path.exists() or self.world > 1:
            if self.rank == 0:
                self.store.clear()
            dist.barrier()
            return self._new_state(fp)
        import json

        state = _unpack(self._read_state(path))
        if state.get("version") != STATE_VERSION:
            raise SaeforgeError(f"{path} has state version {state.get('version')}; rerun without --resume")
        old = state.get("fingerprint", {})
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise SaeforgeError(f"{path} belongs to a different evaluation (differs in {', '.join(diff)}); "
                                "use another --out or drop --resume")
        self.store.sha = dict(state.get("chunk_sha", {}))
        for i in range(len(self.names)):
            st = state.get("stats", {}).get(str(i), {})
            if "recon" in st:
                self.recon[i].load_state_dict(st["recon"])
                self.recon_hooks[i].load_state_dict(st["recon_hooks"])
                self.feats[i].load_state_dict(st["feats"])
            if "down" in st:
                self.down[i].load_state_dict(st["down"])
        return state

    @staticmethod
    def _read_state(path: Path) -> dict[str, Any]:
        """The packed state, after checking the checksum it was written with."""
        import json

        fix = "delete it (or drop --resume) to evaluate from the start"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            body, want = doc["state"], doc["sha256"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{path} is not a readable eval state ({e}); {fix}") from None
        if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != want:
            raise CorruptFileError(f"{path} fails its checksum (damaged on disk); {fix}")
        return body

    def save_state(self, state: dict[str, Any]) -> None:
        import json

        if self.out is None or self.rank != 0:
            return
        state["stats"] = {str(i): {"recon": self.recon[i].state_dict(), "feats": self.feats[i].state_dict(),
                                   "recon_hooks": self.recon_hooks[i].state_dict(),
                                   "down": self.down[i].state_dict()} for i in range(len(self.names))}
        state["chunk_sha"] = dict(self.store.sha)
        body = _pack(state)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        write_json_atomic(self.out / STATE, {"sha256": digest, "state": body}, indent=None)

    # ---- passes -----------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[ContextBatch]:
        c = self.cfg
        return context_batches(self.lm.tokenizer, self.data, context_len=c.context_len, batch_size=c.batch_contexts,
                               text_field=c.text_field, split=c.split, keep_special=False, max_tokens=c.n_tokens)

    def _phase(self, phase: str, state: dict[str, Any], step: Callable, progress: bool, on_chunk: Callable | None) -> None:
        ph = state[phase]
        if ph["done"]:
            return
        cb = self.cfg.chunk_batches
        bar = tqdm(total=self.cfg.n_tokens, initial=ph["tokens"], desc=f"eval {phase}", unit="tok",
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        pending: list[dict[str, np.ndarray]] = []

        W, me = self.world, self.rank
        last_chunk = -1

        def commit(chunk: int) -> None:
            keys = pending[0].keys()
            self.store.put(phase, chunk, {k: np.concatenate([p[k] for p in pending]) for k in keys})
            pending.clear()
            ph["chunks_done"] = chunk + 1
            if W == 1:  # one process: the state file is the commit point of each chunk
                self.save_state(state)
            if on_chunk is not None:
                on_chunk(phase, chunk + 1)

        for b, batch in enumerate(self._batches()):
            chunk = b // cb
            last_chunk = chunk
            if chunk < ph["chunks_done"] or chunk % W != me:
                continue
            pending.append(step(batch, b))
            n = int(batch.keep.sum())
            ph["tokens"] += n
            bar.update(n)
            if (b + 1) % cb == 0:
                commit(chunk)
        if pending:
            commit(last_chunk)
        bar.close()
        if W > 1:
            self._merge(phase, ph, last_chunk + 1)
        if ph["tokens"] == 0:
            raise SaeforgeError(f"{self.data} gave no tokens to evaluate on; check --data and --text-field")
        ph["done"] = True
        self.save_state(state)

    def _merge(self, phase: str, ph: dict[str, Any], n_chunks: int) -> None:
        """After a distributed pass: every process gets the merged sums of all (in rank order) and the chunks."""
        stats = (self.recon, self.feats, self.recon_hooks) if phase == "recon" else (self.down,)
        mem = {k: v for k, v in self.store.mem.items() if k[0] == phase}
        parts = dist.all_gather_object(([[s.state_dict() for s in group] for group in stats], ph["tokens"], mem,
                                        dict(self.store.sha)))
        for g, group in enumerate(stats):
            for i, s in enumerate(group):
                merged = None
                for part in parts:
                    other = type(s).__new__(type(s))
                    other.__dict__.update(s.__dict__)
                    other.load_state_dict(part[0][g][i])
                    if merged is None:
                        merged = other
                    else:
                        merged.merge(other)
                group[i] = merged
        for part in parts:
            self.store.mem.update(part[2])
            self.store.sha.update(part[3])  # every chunk file's checksum, whoever wrote it
        ph["tokens"] = sum(p[1] for p in parts)
        ph["chunks_done"] = n_chunks
        dist.barrier()  # every chunk file is written before anyone reads them

    @torch.no_grad()
    def _recon_step(self, batch: ContextBatch, b: int) -> dict[str, np.ndarray]:
        tokens, doc, keep = batch.tokens, batch.doc, batch.keep
        valid = doc >= 0
        am = None if bool(valid.all()) else valid.long()
        acts = capture(self.lm.model, self.points, tokens, attention_mask=am, stop_early=True)
        dev = self.lm.device
        k = keep.to(dev)
        n = int(keep.sum())
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + b)
        p = min(1.0, self.cfg.sample_tokens / self.cfg.n_tokens)
        sampled = (torch.rand(n, generator=gen) < p).to(dev)
        out: dict[str, np.ndarray] = {"sample_n": np.array([int(sampled.sum())], dtype=np.int64)}
        for i, t in enumerate(self.targets):
            w_in, w_out = (sum(acts[hp.name].shape[-1] for hp in pts) for pts in (t.inputs, t.outputs))
            if w_in != t.sae.cfg.d_in or w_out != t.sae.cfg.d_out:
                names = "/".join(",".join(hp.name for hp in pts) for pts in (t.inputs, t.outputs))
                raise SaeforgeError(
                    f"SAE {self.names[i]!r} expects widths d_in={t.sae.cfg.d_in}, d_out={t.sae.cfg.d_out} but hooks "
                    f"{names} give {w_in}/{w_out}; evaluate it on the model it was trained on"
                )
            x, y = t.rows(acts, k)
            vals, idx = [], []
            step = rows_per_step(t.sae.cfg.d_sae)
            for s in range(0, n, step):
                f, y_hat = encode_decode(t.sae, x[s:s + step])
                ys = y[s:s + step]
                self.recon[i].update(ys.reshape(ys.shape[0], -1), y_hat.reshape(ys.shape[0], -1), f)
                self.recon_hooks[i].update(t.sae.split_outputs(ys), t.sae.split_outputs(y_hat), f)
                self.feats[i].update(f)
                v, j = sparse_rows(f, sampled[s:s + step])
                vals.append(v)
                idx.append(j)
            out[f"{i}_sample_vals"] = np.concatenate(vals) if vals else np.zeros(0, np.float32)
            out[f"{i}_sample_idx"] = np.concatenate(idx) if idx else np.zeros(0, np.int32)
        return out

    def _down_step(self, batch: ContextBatch, b: int) -> dict[str, np.ndarray]:
        means: dict[tuple[str, ...], list[torch.Tensor]] = {}
        for i, t in enumerate(self.targets):  # one mean per output hook: the target mean, split per hook
            means.setdefault(t.key, t.sae.split_outputs(torch.from_numpy(self.recon[i].mean).float()))
        recs = downstream_batch(self.lm, batch, self.targets, means, self.cfg.splice_all)
        out = {}
        for i, rec in enumerate(recs):
            self.down[i].update(rec)
            out.update({f"{i}_{k}": v for k, v in rec.items()})
        return out

    # ---- results ----------------------------------------------------------------------------------------------
    def _finish(self, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        results = {}
        c = self.cfg
        for i, (name, sae) in enumerate(self.saes.items()):
            rc = state["recon"]["chunks_done"]
            z = self.store.concat("recon", rc, [f"{i}_sample_vals", f"{i}_sample_idx", "sample_n"])
            sample = (z[f"{i}_sample_vals"], z[f"{i}_sample_idx"].astype(np.int64), int(z["sample_n"].sum()))
            fsum, farr = feature_summary(self.feats[i], sample, sae.W_dec.reshape(sae.cfg.d_sae, -1),
                                         c.dense_threshold, c.quantiles,
                                         c.decoder_chunk)
            self.arrays[name] = farr
            if self.do_downstream:
                keys = [f"{i}_{k}" for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl", "target")]
                pt = self.store.concat("downstream", state["downstream"]["chunks_done"], keys)
                self.per_token[name] = {k.split("_", 1)[1]: v for k, v in pt.items()}
                down = self.down[i].result()
            else:
                why = "the model is an encoder without next-token logits" if not self.lm.is_causal \
                    else "downstream evaluation was turned off"
                down = {"skipped": why}
            recon = self.recon[i].result()
            per_hook = self.recon_hooks[i].result()  # an SAE writing several hooks (a crosscoder): one row each
            nonfinite = [f"{part}.{k}" for part, d in (("reconstruction", recon), ("downstream", down))
                         for k, v in d.items() if k in _MUST_BE_FINITE and isinstance(v, (float, int))
                         and not math.isfinite(v)]
            results[name] = jsonable({
                "sae": {"name": name, "arch": sae.cfg.arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                        "d_out": sae.cfg.d_out, "hook": sae.cfg.hook, "target_hook": sae.cfg.target_hook,
                        "input_hooks": sae.input_hooks(), "output_hooks": sae.output_hooks(),
                        "k": getattr(sae.cfg, "k", None), "model": sae.cfg.model,
                        "source": (sae.cfg.metadata or {}).get("source_path")},
                "model": str(self.lm.spec),
                "data": self.data,
                "config": c.to_dict(),
                "reconstruction": recon,
                **({"reconstruction_per_hook": per_hook} if per_hook else {}),
                "features": fsum,
                "downstream": down,
            })
            if nonfinite:  # evaluate_many refuses to pass these off as results (see there)
                results[name]["nonfinite"] = nonfinite
        return results

    def run(self, resume: bool = False, progress: bool = True, on_chunk: Callable | None = None) -> dict[str, dict]:
        """Both passes (skipping what a resumed state has done); returns ``{name: result dict}``."""
        state = self.load_state(resume)
        self.state = state
        if state.get("results") is None:
            self._phase("recon", state, self._recon_step, progress, on_chunk)
            if self.do_downstream:
                self._phase("downstream", state, self._down_step, progress, on_chunk)
            state["results"] = self._finish(state)
            if self.rank == 0:
                self.write_arrays()
                self.save_state(state)
            dist.barrier()  # everyone has read the chunk files
            if self.rank == 0:
                self.store.clear()
        else:
            self.read_arrays()
        return state["results"]

    def sae_dir(self, name: str) -> Path:
        assert self.out is not None
        return self.out if len(self.names) == 1 else self.out / _safe(name)

    def write_arrays(self) -> None:
        """Write each SAE's arrays; their sha256 go into the state (saved right after), checked on read."""
        if self.out is None:
            return
        shas = self.state.setdefault("arrays_sha", {}) if hasattr(self, "state") else {}
        for name in self.names:
            d = self.sae_dir(name)
            for fname, arrays in (("features.npz", self.arrays.get(name)), ("per_token.npz", self.per_token.get(name))):
                if arrays is not None:
                    data = save_npz(d / fname, arrays)
                    shas[str((d / fname).relative_to(self.out))] = hashlib.sha256(data).hexdigest()

    def read_arrays(self) -> None:
        shas = getattr(self, "state", {}).get("arrays_sha", {})
        for name in self.names:
            d = self.sae_dir(name)
            for fname, into in (("features.npz", self.arrays), ("per_token.npz", self.per_token)):
                p = d / fname
                if not p.exists():
                    continue
                data = p.read_bytes()
                want = shas.get(str(p.relative_to(self.out))) if self.out is not None else None
                if want is not None and hashlib.sha256(data).hexdigest() != want:
                    raise CorruptFileError(f"{p} fails its checksum (damaged on disk); rerun the evaluation without "
                                           "--resume to rewrite it")
                into[name] = dict(np.load(io.BytesIO(data)))


def _safe(name: str) -> str:
    s = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name).strip(".")
    return s or "sae"

