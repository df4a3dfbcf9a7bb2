"""Fine-tune around frozen SAEs on KL(clean ‖ spliced) — LoRA on the model (Chen, Engels & Tegmark 2025),
or, as the end-to-end baseline, the SAEs' own parameters on the same objective.

The clean model is the same network with adapters and SAEs disabled, so no second copy is held in memory.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saeforge.adapt.config import AdaptConfig
from saeforge.adapt.lora import add_lora
from saeforge.adapt.objective import next_token_kl
from saeforge.adapt.splice import SpliceState, layer_index, resolve_sae_hooks, spliced, spliced_logits
from saeforge.data.batches import context_batches
from saeforge.device import DTYPES, resolve_device
from saeforge.errors import CorruptFileError, NonFiniteError, SaeforgeError
from saeforge.eval import set_hook
from saeforge.formats import load_sae
from saeforge.io import load_safetensors_verified, save_safetensors_atomic, sha256_file, write_json_atomic
from saeforge.lock import folder_lock
from saeforge.models import LoadedModel, check_context_len, load_model
from saeforge.paths import warn_model_mismatch
from saeforge.sae.base import SAE
from saeforge.tracking import open_tracker
from saeforge.train.checkpoint import flatten_optimizer, unflatten_optimizer
from saeforge.train.guard import check_finite_state, compare_resume, trim_metrics
from saeforge.train.schedule import LR_SCHEDULES, schedule_factor

CHECKPOINT = "adapt_checkpoint.safetensors"


@dataclass
class Adapted:
    """A model with SAEs spliced in and (optionally) a LoRA adapter around them."""

    loaded: LoadedModel
    saes: list[SAE]
    hooks: list
    peft_model: object | None = None
    ranks: dict = field(default_factory=dict)
    state: SpliceState = field(default_factory=SpliceState)

    def adapter_off(self):
        return self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()

    def spliced(self, replace_special: bool = False):
        return spliced(self.loaded.model, self.saes, self.hooks, self.state, replace_special)

    def spliced_logits(self, tokens: torch.Tensor, replace_special: bool = False) -> torch.Tensor:
        """Logits with every SAE spliced (a crosscoder's inputs read by a forward without the splices first)."""
        return spliced_logits(self.loaded.model, tokens, self.saes, self.hooks, self.state, replace_special)


def build(cfg: AdaptConfig) -> Adapted:
    device = resolve_device(cfg.device)

    if not cfg.model:
        raise SaeforgeError("no model to adapt: the SAE names none; pass --model")
    loaded = load_model(cfg.model, tokenizer=cfg.tokenizer, device=device, dtype=DTYPES[cfg.model_dtype],
                        device_map=cfg.device_map)
    if cfg.device_map is not None:
        device = loaded.device  # the SAEs (and the inputs) go where the embedding is
    check_context_len(loaded, cfg.context_len)
    if not loaded.is_causal:
        raise SaeforgeError(f"{cfg.model} is not a causal LM; adaptation needs next-token distributions")
    if not cfg.saes:
        raise SaeforgeError("no SAE given; pass --sae PATH (repeatable)")
    saes = [load_sae(p, device=device).eval() for p in cfg.saes]

    warn_model_mismatch({str(p): s.cfg.model for p, s in zip(cfg.saes, saes)}, cfg.model, "adapt", "--model")
    if cfg.hooks:
        if len(cfg.hooks) not in (1, len(saes)):
            raise SaeforgeError(f"{len(cfg.hooks)} --hook values for {len(saes)} SAEs; give one for all or one "
                                "per --sae")
        for s, h in zip(saes, cfg.hooks * len(saes) if len(cfg.hooks) == 1 else cfg.hooks):
            set_hook(s, h)
    hooks = resolve_sae_hooks(loaded.model, saes, loaded.family)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    ad = Adapted(loaded, saes, hooks)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: the same seed gives the same adapter
    if cfg.trainable == "lora":
        for s in saes:
            s.requires_grad_(False)
        first = min((layer_index(h.module) or 0) + (h.io == "output") for t in hooks for h in t.inputs)
        min_layer = first if cfg.layers == "after" else 0
        if cfg.layers not in ("all", "after"):
            raise SaeforgeError(f"--layers {cfg.layers!r}: use all or after")
        ad.peft_model, ad.ranks = add_lora(loaded.model, loaded.family, cfg.rank, cfg.alpha, cfg.dropout,
                                           min_layer, cfg.target_modules)
    elif cfg.trainable == "sae":
        for s in saes:
            s.requires_grad_(True).train()
    else:
        raise SaeforgeError(f"trainable={cfg.trainable!r}: use lora or sae")
    return ad


def trainable_params(ad: Adapted) -> list[torch.nn.Parameter]:
    mods = [ad.loaded.model] + list(ad.saes)
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def _named_trainables(ad: Adapted) -> dict[str, torch.nn.Parameter]:
    named = {f"model.{n}": p for n, p in ad.loaded.model.named_parameters() if p.requires_grad}
    for i, s in enumerate(ad.saes):
        named.update({f"sae{i}.{n}": p for n, p in s.named_parameters() if p.requires_grad})
    return named


RESUME_FIX = "delete it to start over, then rerun `saeforge adapt train`"
# settings a resumed run may differ in without changing what it computes
_RESUME_FREE = ("device", "device_map", "checkpoint_every", "log_every")


def _resume_identity(cfg: AdaptConfig) -> dict:
    """The settings a resumed run must share; with the constant schedule the budget may grow or shrink."""
    free = _RESUME_FREE + (("tokens",) if cfg.lr_schedule == "constant" else ())
    return {k: v for k, v in cfg.to_dict().items() if k not in free}


def _save_ckpt(path: Path, ad: Adapted, opt, step: int, elapsed: float, cfg: AdaptConfig) -> None:
    named = _named_trainables(ad)
    for n, p in named.items():
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteError(f"adaptation diverged: {n} became non-finite by step {step}; the last checkpoint "
                                 "is kept and nothing was saved; lower --lr, then rerun")
    tensors = {f"param.{n}": p.detach() for n, p in named.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    meta: dict = {"step": step, "elapsed_s": elapsed, "config": _resume_identity(cfg)}
    flatten_optimizer("opt.", opt.state_dict(), tensors, meta)
    save_safetensors_atomic(path, tensors, metadata={"state": json.dumps(meta)}, checksum=True)


def _load_ckpt(path: Path, ad: Adapted, opt, cfg: AdaptConfig) -> tuple[int, float]:
    tensors, metadata = load_safetensors_verified(path, RESUME_FIX)
    try:
        meta = json.loads(metadata["state"])
        params = {n: tensors[f"param.{n}"] for n in _named_trainables(ad)}
        rng = tensors["rng.cpu"]
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptFileError(f"{path} is not a complete adapt checkpoint (missing {e}); {RESUME_FIX}") from None
    compare_resume(path, {"train": meta.get("config")}, {"train": _resume_identity(cfg)}, (),
                   hint="(--tokens may change with the constant schedule) ")
    check_finite_state(path, params.items(), RESUME_FIX)
    with torch.no_grad():
        for n, p in _named_trainables(ad).items():
            if p.shape != params[n].shape:
                raise SaeforgeError(f"{path} holds {n} of shape {tuple(params[n].shape)}, not {tuple(p.shape)}; "
                                    "resume with the original --rank/--sae or use a new --out")
            p.copy_(params[n])
    opt.load_state_dict(unflatten_optimizer("opt.", tensors, meta))
    torch.set_rng_state(rng)
    return meta["step"], meta["elapsed_s"]


def fit(ad: Adapted, cfg: AdaptConfig, out: str | Path, resume: bool = False, progress: bool = True,
        on_log=None, tracking=None) -> list[dict]:
    """Train the trainable parameters on KL(clean ‖ spliced); returns the logged records. Holds ``out``'s lock.
    ``tracking`` (a saeforge.tracking.TrackingConfig) also sends each metric line to wandb/tensorboard."""
    with folder_lock(out, "adapt"):
        return _fit(ad, cfg, Path(out), resume, progress, on_log, tracking)


def _fit(ad: Adapted, cfg: AdaptConfig, out: Path, resume: bool, progress: bool, on_log, tracking=None) -> list[dict]:
    torch.manual_seed(cfg.seed)
    params = trainable_params(ad)
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise SaeforgeError(f"lr_schedule {cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}; pick one")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tok_per_step = cfg.batch_contexts * cfg.context_len
    total = max(1, math.ceil(cfg.tokens / tok_per_step))
    step, elapsed0 = 0, 0.0
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        step, elapsed0 = _load_ckpt(ckpt, ad, opt, cfg)
        trim_metrics(out / "metrics.jsonl", step)
    elif ckpt.exists() and not resume:
        raise SaeforgeError(f"{out} already holds an adapt run; pass --resume or pick a new --out")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    cfg.save(out / "adapt_cfg.json")

    tracker = open_tracker(tracking, out, config={"adapt": cfg.to_dict()}, start_step=step)
    try:
        return _loop(ad, cfg, out, progress, on_log, tracker, params, opt, step, total, elapsed0)
    finally:
        tracker.close()


def _loop(ad: Adapted, cfg: AdaptConfig, out: Path, progress: bool, on_log, tracker, params, opt, step: int,
          total: int, elapsed0: float) -> list[dict]:
    ckpt, tok_per_step = out / CHECKPOINT, cfg.batch_contexts * cfg.context_len
    model = ad.loaded.model
    model.train()
    batches = context_batches(ad.loaded.tokenizer, cfg.data, context_len=cfg.context_len,
                              batch_size=cfg.batch_contexts, text_field=cfg.text_field, loop=True, skip=step)
    device = next(model.parameters()).device
    records, acc, n_acc = [], torch.zeros((), device=device), 0
    t0 = time.perf_counter() - elapsed0
    pbar = tqdm(total=total, initial=step, unit="step", desc=f"adapt ({cfg.trainable})", disable=not progress)
    while step < total:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * schedule_factor(cfg.lr_schedule, step, total, cfg.warmup_frac)
        batch = next(batches)
        tokens, keep = batch.tokens.to(device), batch.keep.to(device)
        with torch.no_grad(), ad.adapter_off():
            model.eval()
            clean = model(input_ids=tokens).logits
            model.train()
        ad.state.keep = keep
        logits = ad.spliced_logits(tokens, cfg.replace_special)
        loss = next_token_kl(clean, logits)
        loss.backward()
        for s in ad.saes if cfg.trainable == "sae" else ():
            s.before_optimizer_step()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for s in ad.saes if cfg.trainable == "sae" else ():
            s.after_optimizer_step(step, total)
        acc += loss.detach().to(device)  # with a device_map the loss sits on the LM head's GPU
        n_acc += 1
        step += 1
        pbar.update(1)
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "tokens": step * tok_per_step, "kl": (acc / n_acc).item(),
                   "elapsed_s": round(time.perf_counter() - t0, 3)}
            if not math.isfinite(rec["kl"]):
                raise NonFiniteError(f"adaptation diverged: the KL became {rec['kl']} by step {step}; the last "
                                     "checkpoint is kept and nothing was saved; lower --lr, then rerun")
            acc, n_acc = torch.zeros((), device=device), 0
            records.append(rec)
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            tracker.log("", out, rec)  # after the source of truth (saeforge/tracking.py)
            pbar.set_postfix(kl=f"{rec['kl']:.4f}")
            if on_log is not None:
                on_log(rec)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_ckpt(ckpt, ad, opt, step, time.perf_counter() - t0, cfg)
    pbar.close()
    _save_ckpt(ckpt, ad, opt, step, time.perf_counter() - t0, cfg)
    model.eval()
    for s in ad.saes:
        s.eval()
    return records


def save(ad: Adapted, cfg: AdaptConfig, out: str | Path, report: dict | None = None) -> Path:
    """Write the adapter (peft format) or the fine-tuned SAEs, the SAEs, and ``adapt.json``."""
    out = Path(out)
    sae_dirs = []
    for i, s in enumerate(ad.saes):
        d = out / "saes" / str(i)
        s.save(d)
        sae_dirs.append(str(d.relative_to(out)))
    if ad.peft_model is not None:
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ad.peft_model.save_pretrained(str(tmp))
        shutil.rmtree(out / "adapter", ignore_errors=True)
        tmp.rename(out / "adapter")
    manifest = {
        "kind": "saeforge-adapt", "config": cfg.to_dict(), "model": cfg.model, "tokenizer": cfg.tokenizer,
        "saes": [{"source": src, "path": d, "hook": ",".join(hp.name for hp in t.inputs),
                  "output_hooks": [hp.name for hp in t.outputs]} for src, d, t in zip(cfg.saes, sae_dirs, ad.hooks)],
        "adapter": "adapter" if ad.peft_model is not None else None, "lora_ranks": ad.ranks, "report": report,
        # the adapter's files are peft's own format (no checksum inside): their sha256 live here, checked by load()
        "adapter_sha256": _folder_sha256(out / "adapter") if ad.peft_model is not None else None,
    }
    write_json_atomic(out / "adapt.json", manifest)
    return out


def _folder_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_adapter(path: Path, manifest: dict) -> None:
    want = manifest.get("adapter_sha256")
    if not want or not manifest.get("adapter"):
        return
    got = _folder_sha256(path / manifest["adapter"])
    bad = sorted(k for k in want if got.get(k) != want[k])
    if bad:
        raise CorruptFileError(f"{path / manifest['adapter'] / bad[0]} is missing or fails its checksum (damaged on "
                               "disk); rerun `saeforge adapt train` into a new --out")


def load(path: str | Path, device: str = "auto", device_map: str | None = None) -> Adapted:
    """Load model + adapter + SAEs written by :func:`save` (``device_map``: as in :class:`AdaptConfig`)."""
    path = Path(path)
    mf = path / "adapt.json"
    if not mf.exists():
        raise SaeforgeError(f"{path} has no adapt.json; point at a folder written by `saeforge adapt train`")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
        manifest["model"], manifest["saes"]  # noqa: B018 - both keys are needed below
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{mf} is damaged ({e}); rerun `saeforge adapt train` into a new --out") from None
    dev = resolve_device(device)

    mdt = DTYPES.get((manifest.get("config") or {}).get("model_dtype", "float32"), torch.float32)
    loaded = load_model(manifest["model"], tokenizer=manifest.get("tokenizer"), device=dev, dtype=mdt,
                        device_map=device_map)
    if device_map is not None:
        dev = loaded.device
    saes = [load_sae(path / s["path"], device=dev).eval() for s in manifest["saes"]]
    hooks = resolve_sae_hooks(loaded.model, saes, loaded.family)
    ad = Adapted(loaded, saes, hooks, ranks=manifest.get("lora_ranks") or {})
    if manifest.get("adapter"):
        from peft import PeftModel

        _check_adapter(path, manifest)
        ad.peft_model = PeftModel.from_pretrained(loaded.model, str(path / manifest["adapter"]))
        ad.peft_model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return ad


def merge(path: str | Path, out: str | Path) -> Path:
    """Merge the adapter into the model weights and save a plain HF model folder (+ the SAEs)."""
    ad = load(path, device="cpu")
    if ad.peft_model is None:
        raise SaeforgeError(f"{path} holds no LoRA adapter to merge (it was an end-to-end SAE run)")
    merged = ad.peft_model.merge_and_unload()
    out = Path(out)
    merged.save_pretrained(str(out))
    manifest = json.loads((Path(path) / "adapt.json").read_text())
    tok = getattr(ad.loaded.tokenizer, "path", None) or manifest.get("tokenizer")
    if tok and Path(str(tok)).is_file():
        shutil.copy(str(tok), out / "tokenizer.bin")
    elif hasattr(ad.loaded.tokenizer, "hf"):
        ad.loaded.tokenizer.hf.save_pretrained(str(out))
    for i, s in enumerate(ad.saes):
        s.save(out / "saes" / str(i))
    return out
