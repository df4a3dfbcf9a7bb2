"""The one trainer: any number of SAEs (any architectures, hooks, widths) from one activation stream.

Each step pulls one :class:`~saeforge.activations.stream.ActivationBatch`, and every SAE takes its
input/target from it (``SAE.inputs_from``), runs ``training_forward`` under autocast, and steps its own
optimizer (Adam, or schedule-free sign descent: ``saeforge/train/optim.py``). The loop never synchronises
with the host except on logging steps: losses accumulate on device and dead-latent counters are updated
with tensor ops.

Recipes reach the loop only through the training contract declared in ``saeforge/sae/base.py`` (every
method has a default there), never through ``if arch == ...``:

* ``default_optimizer()``, ``recommended_lr(total_tokens, rule, optimizer)`` and ``adam_defaults()``
  (betas/eps) fill what ``TrainConfig`` leaves as None;
* ``train_step(inp)`` (the architecture's ``training_forward`` plus the skip term) returns one
  ``TrainStepOutput``;
* ``before_optimizer_step()`` / ``after_optimizer_step(step, total)`` (decoder-norm constraints);
* ``after_metrics(line, step, total)`` at each metrics line (e.g. steering a coefficient to a target L0);
* ``resample_request(tokens_before, tokens_after, total_tokens) -> rows`` and ``resample(x, y, since_fired,
  opt, generator) -> reset latent indices`` (dead-latent resampling, e.g. Bricken et al. 2023). The rows
  come from the *upcoming* training batches, peeked without consuming them, so resampling never
  changes what the SAEs train on and a resumed run sees exactly the same data.

The public step-level API is what :meth:`Trainer.fit` itself uses: ``init_from_data(batch)``,
``step(batch) -> {name: metric line}`` (lines only on logging steps) and ``save(path)``; ``fit`` adds the
file policy (``metrics.jsonl``, checkpoints every ``checkpoint_every`` steps, resume, the folder lock), so a
driver of its own gets the same weights as ``fit`` (tests/test_trainer.py).

Under ``torchrun`` the loop is the same; :class:`~saeforge.train.parallel.Parallel` supplies the few
hooks that differ (which rows this process reads, gradient averaging, the global norm for clipping,
global fired masks, who writes files; docs/distributed.md). With one process they are identities.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections import deque
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from saeforge import faults
from saeforge.activations.stream import ActivationBatch, ActivationStream
from saeforge.device import resolve_device, resolve_dtype
from saeforge.distributed.ops import total_variance
from saeforge.errors import SaeforgeError
from saeforge.lock import folder_lock
from saeforge.sae.base import SAE, SAEConfig, TrainStepInput, create_sae
from saeforge.train.checkpoint import load_checkpoint, save_checkpoint
from saeforge.tracking import Tracker, TrackingConfig, open_tracker
from saeforge.train.config import TrainConfig
from saeforge.train import guard
from saeforge.train.optim import ScheduleFreeSign
from saeforge.train.parallel import Parallel
from saeforge.train.schedule import default_warmup, lr_factor

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class _Run:
    name: str
    sae: SAE
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    since_fired: torch.Tensor
    out: Path
    acc: dict[str, torch.Tensor]
    dead_tokens: int  # the dead-latent window of this run's optimizer (TrainConfig.dead_window)
    n_acc: int = 0
    maybe_dead: bool = True  # host-side: can any latent be dead before the next metrics line?
    fresh: bool = True  # built here from a config: gets data-dependent init; an SAE passed in is kept as is
    resampled: int = 0  # latents reset by resampling since the last metrics line
    grad_norms: torch.Tensor | None = None  # on-device sum of clipped-gradient norms (non-finite if one was)


class _Lookahead:
    """An iterator whose upcoming batches can be peeked without being consumed."""

    def __init__(self, it: Iterator[Any]):
        self.it, self.buf = it, deque()

    def __next__(self) -> Any:
        return self.buf.popleft() if self.buf else next(self.it)

    def peek_rows(self, n_rows: int) -> list[Any]:
        got = sum(len(next(iter(b.acts.values()))) for b in self.buf)
        while got < n_rows:
            try:
                b = next(self.it)
            except StopIteration:
                break
            self.buf.append(b)
            got += len(next(iter(b.acts.values())))
        return list(self.buf)


def _fvu(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """:func:`~saeforge.sae.base.fvu` with the variance of the global batch (this process's share of it), so
    that the replicas' mean is the global batch's FVU; with one process exactly ``fvu``."""
    return (y - y_hat).pow(2).sum() / total_variance(y).clamp_min(1e-12)


def first_rows(stream: Any, n_rows: int) -> ActivationBatch:
    """The first ``n_rows`` rows of ``stream`` (from its start) as one batch: what :meth:`Trainer.fit`
    initialises from."""
    rows: dict[str, list[torch.Tensor]] = {}
    got = 0
    for batch in stream.iterate(0):
        for h, a in batch.acts.items():
            rows.setdefault(h, []).append(a)
        got += next(iter(batch.acts.values())).shape[0]
        if got >= n_rows:
            break
    if got == 0:
        raise SaeforgeError("the activation stream is empty; check --data / the cache")
    return ActivationBatch({h: torch.cat(v)[:n_rows] for h, v in rows.items()})


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def make_adam(params, lr: float, betas, eps: float, fused: bool) -> torch.optim.Adam:
    """Adam; fused (one multi-tensor kernel for the whole update) when asked for and supported."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):  # device or torch without a fused Adam
            pass
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)


class Trainer:
    """Train ``saes`` (name -> SAE or SAEConfig) on ``stream`` into folder ``out``.

    With one SAE named ``""`` the SAE's files go straight into ``out``; otherwise into ``out/<name>``.
    """

    def __init__(self, saes: dict[str, SAE | SAEConfig], stream: ActivationStream, cfg: TrainConfig, out: str | Path,
                 tracking: TrackingConfig | None = None):
        if not saes:
            raise SaeforgeError("nothing to train: give at least one SAE config")
        self.cfg = cfg
        self.tracking = tracking  # --log-to: copies of the metric lines (saeforge/tracking.py)
        self.tracker: Tracker = open_tracker(None, out)
        self.par = Parallel(cfg.shard_latents, cfg.spread, cfg.device, cfg.dp_read)  # torchrun: docs/distributed.md
        if not isinstance(stream, ActivationStream):
            raise SaeforgeError(f"{type(stream).__name__} is not an activation stream: it needs hooks, d, iterate(), "
                                "identity() and __iter__ (subclass saeforge.activations.Stream)")
        self.source = stream  # the global batches (data-dependent init reads these)
        self.stream = self.par.stream(stream)  # this process's rows of each global batch
        self.out = Path(out)
        self.device = resolve_device(cfg.device)
        if cfg.kernels not in ("sparse", "dense"):
            raise SaeforgeError(f"TrainConfig.kernels={cfg.kernels!r}: use 'sparse' or 'dense'")
        self.total_steps = max(1, math.ceil(cfg.total_tokens / cfg.batch_size))
        self.runs: dict[str, _Run] = {}
        self.names = list(saes)  # every SAE of the run (with spread=True a process trains only its own)
        owner = self.par.owners({n: (s.cfg if isinstance(s, SAE) else s).d_sae for n, s in saes.items()})
        self._writes = self.par.writer or self.par.spread  # per-SAE files: rank 0, or each SAE's owner
        for name, s in saes.items():
            if owner[name] != self.par.rank:
                continue
            # every SAE built from a config starts from the same seed, so an SAE trained in a group
            # is bit-identical to the same SAE trained alone
            _seeded(cfg.seed)
            sae = s if isinstance(s, SAE) else create_sae(s)
            sae = self.par.sae(sae.to(self.device))  # its latent-sharded form under --shard-latents
            kind = cfg.optimizer or sae.default_optimizer()
            lr = cfg.lr if cfg.lr is not None else sae.recommended_lr(cfg.total_tokens, cfg.lr_rule, kind)
            sae.sparse_kernels = cfg.kernels == "sparse"
            opt = self._optimizer(kind, sae, lr)
            warmup, decay = self._schedule(kind)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda st, w=warmup, d=decay: lr_factor(st, self.total_steps, w, d)
            )
            since = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
            run_out = self.out if (len(saes) == 1 and name == "") else self.out / name
            self.runs[name] = _Run(name, sae, opt, sched, since, run_out, {}, cfg.dead_window(kind, sae.cfg.d_sae),
                                   fresh=not isinstance(s, SAE))
        _seeded(cfg.seed)
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device,
                                       min((s.cfg if isinstance(s, SAE) else s).d_in for s in saes.values()))
        # compared on resume; every SAE's (a process may train only some of them). A deep copy: the configs'
        # metadata changes during training (e.g. the target-L0 controller's state) and is not part of the identity
        self.init_cfgs = {n: copy.deepcopy((self.runs[n].sae.cfg if n in self.runs else
                                            (s.cfg if isinstance(s, SAE) else s)).to_dict()) for n, s in saes.items()}
        self.last_checkpoint: int | None = None
        self.global_step = 0  # optimizer steps taken (the checkpoint's step)
        self.tokens = 0
        self._max_rows = 0  # largest batch seen: bounds how fast since_fired can grow
        for run in self.runs.values():
            run.sae.train()
        self._t0 = time.perf_counter()  # metric lines' elapsed_s counts from here (fit restarts it)
        self._comm0 = self.par.comm_seconds() or 0.0

    # ---- setup ----------------------------------------------------------------------------------
    def _optimizer(self, kind: str, sae: SAE, lr: float) -> torch.optim.Optimizer:
        """``TrainConfig.optimizer`` (else the architecture's ``default_optimizer()``) for ``sae``."""
        cfg = self.cfg
        if kind == "signum":
            return ScheduleFreeSign(sae.parameters(), lr, cfg.momentum, cfg.average_power_or_default(sae.signum_average_power))
        hints = sae.adam_defaults()
        betas = tuple(cfg.betas) if cfg.betas is not None else tuple(hints.get("betas", (0.9, 0.999)))
        eps = cfg.eps if cfg.eps is not None else hints.get("eps", 1e-8)
        return make_adam(sae.parameters(), lr, betas, eps, cfg.fused_adam)

    def _schedule(self, kind: str) -> tuple[int, float]:
        """(warm-up steps, decay fraction): TrainConfig's, else Adam's min(1000, 5 %) warm-up and 20 % linear
        decay; schedule-free sign descent needs neither (its average replaces the decay)."""
        cfg = self.cfg
        free = kind == "signum"
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else (0 if free else default_warmup(self.total_steps))
        decay = cfg.decay_frac if cfg.decay_frac is not None else (0.0 if free else 0.2)
        return warmup, decay

    def init_from_data(self, batch: ActivationBatch) -> None:
        """Data-dependent initialisation of every SAE built here from a config (geometric median, scales...)
        from the rows of ``batch``; an SAE handed in (pre-trained, loaded, hand-set) keeps its weights.
        :meth:`fit` passes the stream's first ``cfg.init_tokens`` rows (:func:`first_rows`)."""
        sample = {h: a.to(self.device).float() for h, a in batch.acts.items()}
        for h, x in sample.items():
            if not bool(torch.isfinite(x).all()):
                raise guard.NonFiniteError(f"the training data holds NaN/Inf activations at hook {h}; harvest it "
                                           "again (harvest refuses non-finite rows) or use --on-nonfinite skip")
        for run in self.runs.values():
            if run.fresh:
                x, y = run.sae.inputs_from(sample)
                run.sae.init_from_data(x, y)
            self.par.after_init(run.sae)

    def identity(self) -> dict[str, Any]:
        """Everything a resumed run must share with the run it continues (see guard.compare_resume)."""
        train = self.cfg.to_dict()
        for k in ("shard_latents", "spread"):  # how the work is split, not what is computed
            train.pop(k, None)
        if train.get("dp_read") == "exact":  # the default: checkpoints from before the option keep their identity
            train.pop("dp_read")
        elif self.par.replicas > 1:  # disjoint reads: the batches depend on the number of replicas
            train["dp_replicas"] = self.par.replicas
        return {"train": train, "saes": self.init_cfgs, "data": self.source.identity()}

    def _resume(self, allow_changes: tuple[str, ...] = ()) -> bool:
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        meta, states, rng = load_checkpoint(path)
        if sorted(meta["names"]) != sorted(self.names):
            raise SaeforgeError(f"{path} holds SAEs {meta['names']}, not {sorted(self.names)}; use a new --out")
        old = (meta.get("identity") or {}).get("train") or {}
        new = self.identity()["train"]
        r_old, r_new = old.get("dp_replicas", 1), new.get("dp_replicas", 1)
        if old.get("dp_read") == new.get("dp_read") == "disjoint" and r_old != r_new:
            raise SaeforgeError(
                f"{path} was trained with --dp-read disjoint over {r_old} "
                f"replica(s) and this run has {r_new}; with --dp-read disjoint the batches depend "
                "on the number of replicas, so resume with the same number of processes (and --shard-latents)"
            )
        guard.compare_resume(path, meta.get("identity") or {}, self.identity(), allow_changes)
        guard.check_finite_state(path, ((f"{n}.{k}", v) for n, st in states.items() for k, v in st["model"].items()),
                                 "delete it and train again with a lower --lr")
        if meta.get("total_steps") != self.total_steps and "total_tokens" not in allow_changes:
            raise SaeforgeError(
                f"{path} was made for {meta.get('total_steps')} steps, not {self.total_steps}; "
                "resume with the same --tokens and --batch-size"
            )
        for name, run in self.runs.items():
            st = states[name]
            run.sae.cfg = type(run.sae.cfg).from_dict(meta["cfgs"][name])
            self.par.load_states(run.sae, run.opt, st["model"], st["opt"])  # this process's slice when sharded
            run.sae.to(self.device)
            run.since_fired = st["since_fired"].to(self.device)
            acc = (meta.get("acc") or {}).get(name)
            if acc is not None:
                f32 = dict(dtype=torch.float32, device=self.device)
                run.acc = {k: torch.tensor(v, **f32) for k, v in acc["sums"].items()}
                run.n_acc = acc["n"]
                run.grad_norms = None if acc["grad_norms"] is None else torch.tensor(acc["grad_norms"], **f32)
                run.maybe_dead = acc["maybe_dead"]
            run.sched.last_epoch = meta["step"] - 1
            with warnings.catch_warnings():  # stepping the schedule to where it was, not an early step
                warnings.simplefilter("ignore", UserWarning)
                run.sched.step()
        torch.set_rng_state(rng)
        self.global_step, self.tokens = meta["step"], meta["tokens"]
        self._max_rows = meta.get("max_rows", 0)
        self.last_checkpoint = self.global_step
        for run in self.runs.values():  # lines logged after the checkpoint are logged again
            if self._writes:
                guard.trim_metrics(run.out / "metrics.jsonl", self.global_step)
        return True

    def _check_finite(self) -> None:
        """Host check before anything is written: pending losses, gradient norms and weights are finite."""
        for run in self.runs.values():
            pending = {k: float(v / max(run.n_acc, 1)) for k, v in run.acc.items()}
            if run.grad_norms is not None:
                pending["gradient norm"] = float(run.grad_norms)
            guard.check_finite(run.name, pending, self.global_step, self.last_checkpoint)
            guard.check_finite_params(run.name, run.sae, self.global_step, self.last_checkpoint)

    def checkpoint(self) -> None:
        """Write ``out/checkpoint.safetensors``: everything a resumed run needs to continue this one exactly."""
        self._check_finite()
        runs, cfgs, acc = {}, {}, {}
        for n, r in self.runs.items():
            model, opt = self.par.full_states(r.sae, r.opt)  # unsharded: resumes with any number of processes
            runs[n] = {"sae": model, "opt": opt, "since_fired": r.since_fired}
            cfgs[n] = r.sae.cfg.to_dict()
            # the metric sums since the last line (averaged over replicas), so a resumed run writes the same
            # metrics.jsonl
            acc[n] = {"n": r.n_acc, "sums": {k: v.item() for k, v in self.par.mean_metrics(r.acc).items()},
                      "grad_norms": None if r.grad_norms is None else r.grad_norms.item(), "maybe_dead": r.maybe_dead}
        if self.par.spread:  # every SAE's state, from its owner
            parts = self.par.gather_object((runs, cfgs, acc))
            runs = {n: p[0][n] for n in self.names for p in parts if n in p[0]}
            cfgs = {n: p[1][n] for n in self.names for p in parts if n in p[1]}
            acc = {n: p[2][n] for n in self.names for p in parts if n in p[2]}
        if self.par.writer:
            extra = {"total_steps": self.total_steps, "cfgs": cfgs, "identity": self.identity(), "acc": acc,
                     "max_rows": self._max_rows}
            save_checkpoint(self.out / CHECKPOINT, self.global_step, self.tokens, runs, extra)
        self.last_checkpoint = self.global_step

    def save(self, path: str | Path | None = None) -> dict[str, SAE]:
        """Save every SAE (``cfg.json`` + ``sae.safetensors``) into ``path`` (default ``out``), a single SAE
        named ``""`` straight into it, others into ``path/<name>``; returns them (gathered when sharded)."""
        self._check_finite()
        saved = {}
        for name, run in self.runs.items():
            sae = saved[name] = self.par.full_sae(run.sae)  # the ordinary SAE (gathered when sharded)
            sae.cfg.metadata.setdefault("trainer", "saeforge")
            sae.cfg.metadata["train_tokens"] = self.tokens
            if self._writes:
                sae.save(run.out if path is None else Path(path) / run.out.relative_to(self.out))
        return saved

    # ---- one step -------------------------------------------------------------------------------
    def step(self, batch: ActivationBatch,
             peek: Callable[[int], list[ActivationBatch]] | None = None) -> dict[str, dict[str, Any]]:
        """One optimizer step of every SAE on ``batch`` (under torchrun: this process's rows of it).

        Returns the metric lines this step completes, ``{name: line}``: every ``cfg.log_every`` steps and at
        the last one (a line averages the steps since the previous one; it is the loop's only host sync),
        else ``{}``. ``peek(n_rows)`` returns the upcoming batches without consuming them, for the SAEs'
        dead-latent resampling; without it resampling draws on ``batch``. Writes nothing: :meth:`fit` is
        the policy that appends lines to ``metrics.jsonl`` and checkpoints.
        """
        acts = {h: a.to(self.device, non_blocking=True) for h, a in batch.acts.items()}
        n_rows = batch.global_rows or next(iter(acts.values())).shape[0]
        for run in self.runs.values():
            self._step_sae(run, acts, n_rows)
        self._maybe_resample(peek or (lambda rows: [batch]), self.tokens, self.tokens + n_rows)
        self.tokens += n_rows
        self._max_rows = max(self._max_rows, n_rows)
        self.global_step += 1
        if self.global_step % self.cfg.log_every == 0 or self.global_step == self.total_steps:
            return self._metric_lines()
        return {}

    def _step_sae(self, run: _Run, acts: dict[str, torch.Tensor], n_rows: int) -> None:
        """One optimizer step of one SAE; ``n_rows`` is the global batch size (this process may hold a part)."""
        x, y = run.sae.inputs_from(acts)
        # While no latent can have reached dead_tokens, the dead mask is all False and AuxK is zero: skip it
        # (and its extra top-k) without a host sync. _refresh_dead() proves that bound at each metrics line.
        dead = run.since_fired >= run.dead_tokens if run.maybe_dead else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            out = run.sae.train_step(TrainStepInput(x, y, self.global_step, self.total_steps, dead,
                                                         global_rows=n_rows))
        out.loss.float().backward()
        self.par.sync_grads(run.sae, x.shape[0], n_rows)
        run.sae.before_optimizer_step()
        if self.cfg.grad_clip > 0:
            # the norm feeds the log and the non-finite guard; sign descent skips the rescale (no effect on signs)
            rescale = not isinstance(run.opt, ScheduleFreeSign)
            norm = self.par.clip_grad_norm_(run.sae, self.cfg.grad_clip, scale=rescale)
            run.grad_norms = norm.detach() if run.grad_norms is None else run.grad_norms + norm.detach()
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        run.sae.after_optimizer_step(self.global_step, self.total_steps)
        run.since_fired += n_rows
        run.since_fired.masked_fill_(self.par.fired(out.fired), 0)
        with torch.no_grad():
            parts = {"loss": out.loss.float(), "fvu": _fvu(out.y.float(), out.y_hat.float()), "l0": out.l0.float()}
            parts.update({k: v.float() for k, v in out.losses.items()})
            for k, v in parts.items():
                run.acc[k] = run.acc[k] + v.detach() if k in run.acc else v.detach().clone()
            run.n_acc += 1

    def _maybe_resample(self, peek: Callable[[int], list[ActivationBatch]], tokens_before: int,
                        tokens_after: int) -> None:
        """Run the SAEs' resampling hooks that are due after this step (see the module docstring)."""
        due = {}
        for name, run in self.runs.items():
            rows = run.sae.resample_request(tokens_before, tokens_after, self.cfg.total_tokens)
            if rows > 0:
                due[name] = rows
        if not due:
            return
        batches = peek(max(due.values()))
        if not batches:
            return
        sample = {h: torch.cat([b.acts[h] for b in batches]).to(self.device).float() for h in batches[0].acts}
        for name, rows in due.items():
            run = self.runs[name]
            x, y = run.sae.inputs_from({h: a[:rows] for h, a in sample.items()})
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
            reset = run.sae.resample(x, y, run.since_fired, run.opt, gen)
            run.since_fired[reset] = 0
            run.resampled += int(reset.numel())
            self.par.after_resample(run.sae, run.opt, run.since_fired)

    def _refresh_dead(self) -> None:
        """Host check, once per metrics line: ``since_fired`` grows by at most one batch per step, so if its
        maximum plus the tokens until the next line stays below ``dead_tokens``, no latent can die before then."""
        if self._max_rows == 0:
            return  # no batch seen yet: keep the default (maybe dead)
        horizon = (self.cfg.log_every + 1) * self._max_rows
        for run in self.runs.values():
            run.maybe_dead = bool((run.since_fired.max() + horizon >= run.dead_tokens).item())

    def _metric_lines(self) -> dict[str, dict[str, Any]]:
        """Each SAE's metric line (the averages since the last one); resets the sums."""
        lines = {}
        for run in self.runs.values():
            if run.n_acc == 0:
                continue
            rec: dict[str, Any] = {"step": self.global_step, "tokens": self.tokens, "lr": run.sched.get_last_lr()[0]}
            rec.update({k: (v / run.n_acc).item() for k, v in self.par.mean_metrics(run.acc).items()})
            guard.check_finite(run.name, {**rec, **({"gradient norm": float(run.grad_norms)}
                                                    if run.grad_norms is not None else {})},
                               self.global_step, self.last_checkpoint)
            run.grad_norms = None
            rec["dead_frac"] = (run.since_fired >= run.dead_tokens).float().mean().item()
            rec["elapsed_s"] = round(time.perf_counter() - self._t0, 3)
            comm = self.par.comm_seconds()
            if comm is not None:  # under torchrun: time in collectives since the start (this process)
                rec["comm_s"] = round(comm - self._comm0, 3)
            if run.resampled:
                rec["resampled"], run.resampled = run.resampled, 0
            run.sae.after_metrics(rec, self.global_step, self.total_steps)
            run.acc, run.n_acc = {}, 0
            lines[run.name] = rec
        self._refresh_dead()
        return lines

    # ---- the loop: steps, plus the file policy --------------------------------------------------
    def _write_metrics(self, lines: dict[str, dict[str, Any]], pbar: tqdm) -> None:
        """Append each line to its SAE's ``metrics.jsonl`` (the source of truth), then to the trackers."""
        for name, rec in lines.items():
            run = self.runs[name]
            if self._writes:
                run.out.mkdir(parents=True, exist_ok=True)
                with open(run.out / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                self.tracker.log(run.name, run.out, rec)  # after the source of truth; rank 0 only
        if lines:
            rec = next(iter(lines.values()))
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", fvu=f"{rec['fvu']:.4f}", l0=f"{rec['l0']:.1f}",
                             dead=f"{rec['dead_frac']:.1%}")

    def fit(self, resume: bool = False, progress: bool = True, allow_changes: tuple[str, ...] = ()) -> dict[str, SAE]:
        """Train to ``total_tokens`` (continuing the checkpoint in ``out`` with ``resume``), holding ``out``'s
        write lock; ``allow_changes`` names settings a resumed run may change (guard.RESUME_CHANGEABLE).

        The loop is :meth:`init_from_data` (or the checkpoint), :meth:`step` per batch, and the file policy:
        metric lines appended to ``metrics.jsonl``, a checkpoint every ``cfg.checkpoint_every`` steps and at
        the end, then :meth:`save`."""
        with folder_lock(self.out, "train"):
            try:
                return self._fit(resume, progress, tuple(allow_changes))
            finally:
                self.tracker.close()

    def _fit(self, resume: bool, progress: bool, allow_changes: tuple[str, ...]) -> dict[str, SAE]:
        if not (resume and self._resume(allow_changes)):
            if (self.out / CHECKPOINT).exists():
                raise SaeforgeError(f"{self.out} already holds a training run; pass --resume or pick a new --out")
            for run in self.runs.values():
                if self._writes:
                    (run.out / "metrics.jsonl").unlink(missing_ok=True)
            self.init_from_data(first_rows(self.source, self.cfg.init_tokens))
        if self.par.writer:
            self.cfg.save(self.out / "train_cfg.json")
        self.tracker = open_tracker(self.tracking, self.out, start_step=self.global_step, config={
            "train": self.cfg.to_dict(), "saes": {n: r.sae.cfg.to_dict() for n, r in self.runs.items()}})
        for run in self.runs.values():
            run.sae.train()
        pbar = tqdm(total=self.total_steps, initial=self.global_step, unit="step",
                    disable=not (progress and self.par.writer), desc="train", dynamic_ncols=True)
        self._t0 = time.perf_counter()
        self._comm0 = self.par.comm_seconds() or 0.0
        it = _Lookahead(iter(self.stream.iterate(self.global_step)))
        while self.global_step < self.total_steps:
            try:
                batch = next(it)
            except StopIteration:
                raise SaeforgeError(
                    "the activation stream ran out before --tokens was reached; use a stream that loops "
                    "(epochs=None) or lower --tokens"
                ) from None
            lines = self.step(batch, it.peek_rows)
            pbar.update(1)
            faults.point("train:step")
            self._write_metrics(lines, pbar)
            if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                self.checkpoint()
        pbar.close()
        self.checkpoint()
        saved = self.save()
        self.par.barrier()  # every process's files are written before any returns
        for sae in saved.values():
            sae.eval()
        return saved


def train(
    saes: SAEConfig | SAE | dict[str, SAE | SAEConfig],
    stream: Any,
    cfg: TrainConfig | None = None,
    out: str | Path = "runs/sae",
    resume: bool = False,
    progress: bool = True,
    allow_changes: tuple[str, ...] = (),
    tracking: TrackingConfig | None = None,
) -> SAE | dict[str, SAE]:
    """Python API mirroring ``saeforge train``: one SAE in -> one SAE out; a dict in -> a dict out."""
    single = not isinstance(saes, dict)
    trainer = Trainer({"": saes} if single else saes, stream, cfg or TrainConfig(), out, tracking)
    result = trainer.fit(resume=resume, progress=progress, allow_changes=allow_changes)
    return result[""] if single else result
