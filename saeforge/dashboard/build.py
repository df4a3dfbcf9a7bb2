"""``saeforge dashboard build``: open the data, stream it once through the SAE, then write the site.

The data is an activation cache (``saeforge harvest``) or text run through the model; either way it arrives as
chunks of rows (the kept tokens in document order, with token id / document / position), the SAE encodes
them, and :class:`~saeforge.dashboard.stream.LatentStats` keeps every latent's statistics (see
``stream.py`` for the vectorised state). The pass is resumable: every ``checkpoint_rows`` rows the state
(with the halo and the random generator) is written atomically to ``OUT/.build/state.safetensors``; a rerun
with the same settings continues from there and ends bit-identical to an uninterrupted run, and a rerun of
a finished build only rewrites the site (e.g. with new ``--explanations``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from saeforge.activations.cache import ActivationCache, forward_rows
from saeforge.config import JsonConfig
from saeforge.dashboard import logits as lg
from saeforge.dashboard.site import load_explanations, write_site
from saeforge.dashboard.stream import Halo, LatentStats
from saeforge.data.batches import context_batches
from saeforge.device import resolve_device
from saeforge.errors import CorruptFileError, NonFiniteError, SaeforgeError
from saeforge.formats import load_sae
from saeforge.hooks import resolve_hook
from saeforge.io import load_safetensors_verified, save_safetensors_atomic
from saeforge.lock import folder_lock
from saeforge.models import check_context_len, load_model
from saeforge.paths import warn_model_mismatch

STATE_FILE = "state.safetensors"


@dataclass
class DashboardConfig(JsonConfig):
    """What to build. The fields in :meth:`identity` decide the streamed statistics (a checkpoint made with
    other values is refused); the rest (``out``, ``device``, ``explanations`` and the display knobs: bands,
    histogram bins, logits, neighbours, shard size) only shape the site, so changing them reuses the pass."""

    FLAGS: ClassVar[dict[str, str]] = {"sae_format": "--format", "n_bands": "--bands", "n_logits": "--logits",
                                       "n_neighbors": "--neighbors"}

    sae: str
    data: str
    out: str
    model: str | None = None  # default: the SAE's cfg.model, or the cache manifest's model
    tokenizer: str | None = None
    hook: str | None = None  # default: the SAE's input hook
    sae_format: str | None = None  # default: detected (saeforge.formats.load_sae)
    explanations: str | None = None  # eval.json / n2g JSON with {"explanations": {id: {...}}}
    top_k: int = 20
    context: int = 10  # tokens shown on each side of an example
    n_bands: int = 10
    per_band: int = 5
    reservoir: int | None = None  # band sample size per latent; default 2 * n_bands * per_band
    hist_bins: int = 40  # bins of the displayed activation and logit histograms
    n_logits: int = 10
    n_neighbors: int = 10
    max_tokens: int | None = None
    context_len: int = 128  # packing, for text data
    batch_contexts: int | None = None  # contexts per forward pass; None: about 2M residual floats per pass
    text_field: str = "text"
    split: str = "train"
    shard_size: int = 16  # latents per data shard of the site
    checkpoint_rows: int = 262144
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        for name in ("top_k", "n_bands", "per_band", "hist_bins", "n_logits", "shard_size", "context_len",
                     "checkpoint_rows"):
            if getattr(self, name) < 1:
                raise SaeforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_contexts is not None and self.batch_contexts < 1:
            raise SaeforgeError(f"batch_contexts must be positive, got {self.batch_contexts}")
        if self.context < 0 or self.n_neighbors < 0:
            raise SaeforgeError("context and n_neighbors must be >= 0")
        if self.reservoir is not None and self.reservoir < self.per_band:
            raise SaeforgeError(f"reservoir={self.reservoir} must be at least per_band={self.per_band}")

    @property
    def reservoir_size(self) -> int:
        return self.reservoir or 2 * self.n_bands * self.per_band

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in ("out", "device", "explanations", "hist_bins", "n_logits", "n_neighbors", "shard_size",
                  "checkpoint_rows", "n_bands", "per_band"):
            d.pop(k)
        d["reservoir"] = self.reservoir_size
        return d


def _fingerprint(sae: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Source:
    """Where rows come from: ``chunks(skip)`` yields ``{"x", "tok", "doc", "pos"}`` dicts in stream order."""

    kind: str  # "cache" | "text"
    describe: dict[str, Any]
    total_rows: int | None
    chunks: Callable[[int], Iterator[dict[str, Tensor]]]
    loaded: Any  # LoadedModel (tokenizer + unembedding)


def _warn_mismatch(sae: Any, spec: str | None) -> None:
    """One stderr line when the dashboard runs the SAE on a model other than the one it names."""
    warn_model_mismatch({"": getattr(sae.cfg, "model", None)}, spec, "dashboard", "--model/--hook")


def stacked(sae: Any, hooks: list[str], acts: dict[str, Tensor]) -> Tensor:
    """The SAE's input rows from the activations at ``hooks`` (its input hooks, or the one ``--hook``)."""
    return sae.stack_inputs(dict(zip(sae.input_hooks() or hooks, (acts[h] for h in hooks))))


def open_source(cfg: DashboardConfig, sae: Any, hooks: list[str], device: torch.device) -> Source:
    """Rows of the activations at ``hooks`` (an SAE's or transcoder's input hook, or every hook a crosscoder
    reads), stacked into the SAE's input ``x``."""
    data = Path(cfg.data)
    if data.is_dir() and (data / "manifest.json").exists():
        cache = ActivationCache(data)
        missing = [h for h in hooks if h not in cache.d]
        if missing:
            raise SaeforgeError(f"cache {data} has no hook {missing[0]!r} (it has {cache.hooks}); pass --hook or "
                                "harvest it")
        if sum(cache.d[h] for h in hooks) != sae.cfg.d_in:
            raise SaeforgeError(f"cache {data} holds width {sum(cache.d[h] for h in hooks)} at {','.join(hooks)}, "
                                f"but the SAE reads width {sae.cfg.d_in}; use the cache of the model the SAE was "
                                "trained on")
        mcfg = cache.manifest.get("config", {})
        spec = cfg.model or cache.model_spec or sae.cfg.model
        loaded = load_model(spec, tokenizer=cfg.tokenizer or mcfg.get("tokenizer"), device=device)
        _warn_mismatch(sae, spec)
        limit = cfg.max_tokens

        def chunks(skip: int) -> Iterator[dict[str, Tensor]]:
            seen = sum(cache.shard_rows(i) for i in range(min(skip, cache.n_shards)))
            for i in range(skip, cache.n_shards):
                if limit is not None and seen >= limit:
                    return
                s = cache.shard(i, hooks)
                n = s["token_id"].shape[0] if limit is None else min(s["token_id"].shape[0], limit - seen)
                seen += n
                x = stacked(sae, hooks, {h: s[f"acts.{h}"][:n].float() for h in hooks})
                yield {"x": x, "tok": s["token_id"][:n].long(),
                       "doc": s["doc"][:n].long(), "pos": s["pos"][:n].long()}

        total = cache.n_tokens if limit is None else min(cache.n_tokens, limit)
        desc = {"cache": str(data), "harvest": mcfg}
        return Source("cache", desc, total, chunks, loaded)

    spec = cfg.model or sae.cfg.model
    if not spec:
        raise SaeforgeError(f"the SAE names no model and {cfg.data} is text; pass --model (a .bin, folder or hub id)")
    loaded = load_model(spec, tokenizer=cfg.tokenizer, device=device)
    _warn_mismatch(sae, spec)

    check_context_len(loaded, cfg.context_len)
    hps = [resolve_hook(loaded, h) for h in hooks]
    # Small models spend most of a forward pass in per-call overhead: stories260K costs 5x less CPU per
    # token with 256 contexts per pass than with 32. Aim at ~2M residual floats per pass, within [8, 256].
    per_pass = cfg.batch_contexts or int(min(256, max(8, 2**21 // (cfg.context_len * loaded.d_model))))

    def text_chunks(skip: int) -> Iterator[dict[str, Tensor]]:
        batches = context_batches(loaded.tokenizer, cfg.data, context_len=cfg.context_len,
                                  batch_size=per_pass, text_field=cfg.text_field, split=cfg.split,
                                  max_tokens=cfg.max_tokens)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            r = forward_rows(loaded.model, hps, batch, device)
            acts = {h: r[f"acts.{hp.name}"].float() for h, hp in zip(hooks, hps)}
            where = ",".join(hooks)
            if not all(bool(torch.isfinite(a).all()) for a in acts.values()):
                raise NonFiniteError(f"{spec} gives NaN/Inf activations at {where} on {cfg.data} (batch {i}); the "
                                     "dashboard would show garbage: check the model and the data")
            width = sum(a.shape[-1] for a in acts.values())
            if width != sae.cfg.d_in:
                raise SaeforgeError(f"{spec} gives width {width} at {where}, but the SAE reads "
                                    f"width {sae.cfg.d_in}; pass the --model the SAE was trained on")
            yield {"x": stacked(sae, hooks, acts), "tok": r["token_id"].long(), "doc": r["doc"],
                   "pos": r["pos"].long()}

    desc = {"text": cfg.data, "model": str(spec), "context_len": cfg.context_len}
    return Source("text", desc, cfg.max_tokens, text_chunks, loaded)


# ---------------------------------------------------------------------------------------------- the pass
def sparse_encoder(sae: Any) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``x -> (row, latent, value)`` of the non-zero activations, sorted by (row, latent).

    Uses the SAE's own ``encode_sparse`` (TopK: no dense [rows, d_sae] code is ever built) when the class
    that defines it also defines how ``encode``/``activate`` work, else the dense ``encode``.
    """
    cls = type(sae)

    def owner(name: str) -> type:
        return next(k for k in cls.__mro__ if name in k.__dict__)

    if hasattr(cls, "encode_sparse") and all(issubclass(owner("encode_sparse"), owner(n)) for n in ("encode", "activate")):
        def enc_sparse(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            vals, idx = sae.encode_sparse(x)
            idx, order = idx.sort(dim=-1)  # rows are in order already; sort each row's k latents
            vals = vals.gather(-1, order)
            r = torch.arange(x.shape[0], device=x.device).repeat_interleave(vals.shape[-1])
            lat, v = idx.reshape(-1), vals.reshape(-1).float()
            keep = v > 0
            return r[keep], lat[keep], v[keep]

        return enc_sparse

    def enc_dense(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = sae.encode(x).float()
        r, lat = (a > 0).nonzero(as_tuple=True)
        return r, lat, a[r, lat]

    return enc_dense


def step_rows(d_sae: int) -> int:
    """Rows per compute step: keep the dense [rows, d_sae] activations near 32M floats (128 MB)."""
    return int(max(256, min(8192, 2**25 // max(d_sae, 1))))


def run_pass(cfg: DashboardConfig, sae: Any, source: Source, state_dir: Path, progress: bool = True) -> LatentStats:
    """Stream every row once through the SAE into a :class:`LatentStats`, checkpointing as it goes."""
    from tqdm.auto import tqdm

    device = next(sae.parameters()).device
    stats = LatentStats(sae.cfg.d_sae, cfg.top_k, cfg.context, cfg.reservoir_size, cfg.seed, device)

    encode = sparse_encoder(sae)

    def process(rows: dict[str, Tensor], lo: int, hi: int) -> None:
        with torch.no_grad():
            r, lat, v = encode(rows["x"].to(device))
        stats.update(rows["x"].shape[0], r, lat, v, lo, hi, *(rows[k].to(device) for k in ("tok", "doc", "pos", "row")))

    halo = Halo(cfg.context, step_rows(sae.cfg.d_sae), process)
    state_path = state_dir / STATE_FILE
    identity = {"config": cfg.identity(), "sae": _fingerprint(sae)}
    chunks_done = 0
    if state_path.exists():
        fix = "rerun `saeforge dashboard build` with --overwrite to start the pass again"
        sd, metadata = load_safetensors_verified(state_path, fix)
        try:
            meta = json.loads(metadata["meta"])
            meta["identity"], meta["chunks_done"]  # noqa: B018 - both keys are needed
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptFileError(f"{state_path} is not a complete dashboard state (missing {e}); {fix}") from None
        if meta["identity"] != identity:
            raise SaeforgeError(f"{state_dir} holds a build with other settings or another SAE; pass --overwrite "
                                "or pick a new --out")
        try:
            stats.load_state_dict(sd)
            halo.load_state_dict(sd)
        except (KeyError, RuntimeError) as e:
            raise CorruptFileError(f"{state_path} does not hold a complete dashboard state ({e}); {fix}") from None
        chunks_done = meta["chunks_done"]
        if meta.get("complete"):
            return stats

    def checkpoint(complete: bool) -> None:
        sd = {**stats.state_dict(), **halo.state_dict()}
        meta = {"identity": identity, "chunks_done": chunks_done, "complete": complete}
        save_safetensors_atomic(state_path, sd, metadata={"meta": json.dumps(meta)}, checksum=True)

    bar = tqdm(total=source.total_rows, initial=halo.rows_in, unit="tok", unit_scale=True, desc="dashboard",
               disable=not progress, dynamic_ncols=True)
    since = 0
    try:
        for chunk in source.chunks(chunks_done):
            halo.feed(chunk)
            chunks_done += 1
            n = chunk["x"].shape[0]
            bar.update(n)
            since += n
            if since >= cfg.checkpoint_rows:
                checkpoint(False)
                since = 0
        halo.feed(None, final=True)
    finally:
        bar.close()
    if stats.n_rows == 0:
        raise SaeforgeError(f"{cfg.data} gave no rows; use more text or a complete activation cache")
    checkpoint(True)
    return stats


def build_dashboard(cfg: DashboardConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Run the streaming pass (resuming a checkpoint if there is one) and write the static site to ``cfg.out``."""
    import shutil

    cfg.validate()

    with folder_lock(cfg.out, "dashboard"):
        return _build_locked(cfg, progress, overwrite)


def _build_locked(cfg: DashboardConfig, progress: bool, overwrite: bool) -> Path:
    import shutil

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    state_dir = out / ".build"
    if overwrite and state_dir.exists():
        shutil.rmtree(state_dir)
    explanations = load_explanations(cfg.explanations) if cfg.explanations else {}
    sae = load_sae(cfg.sae, format=cfg.sae_format, device=device).eval()
    hooks = [cfg.hook] if cfg.hook else sae.input_hooks()
    if not hooks:
        raise SaeforgeError("the SAE names no input hook; pass --hook (e.g. resid_post.2)")
    if cfg.hook and len(sae.input_hooks()) > 1:
        raise SaeforgeError(f"--hook {cfg.hook!r}: this SAE reads several hooks ({', '.join(sae.input_hooks())}); "
                            "build it without --hook")
    source = open_source(cfg, sae, hooks, device)
    state_dir.mkdir(parents=True, exist_ok=True)
    stats = run_pass(cfg, sae, source, state_dir, progress=progress)
    blocks = {h: w.detach().float() for h, w in sae.decoder_blocks().items()}
    # logit effects of the last output hook's directions (a crosscoder's last listed hook: list hooks in
    # layer order and it is the one nearest the unembedding); neighbours by the whole decoder
    logit_hook, W_out = list(blocks.items())[-1]
    effects = lg.logit_effects_for_model(W_out, source.loaded, k=cfg.n_logits, bins=cfg.hist_bins)
    W_dec = sae.W_dec.detach().float().reshape(sae.cfg.d_sae, -1)
    neighbors = lg.decoder_neighbors(W_dec, cfg.n_neighbors) if cfg.n_neighbors else None
    info = {"sae": cfg.sae, "arch": sae.cfg.arch, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "hook": ",".join(hooks), "target_hook": sae.cfg.target_hook, "transcoder": bool(sae.cfg.is_transcoder),
            "input_hooks": hooks, "output_hooks": list(blocks), "logit_hook": logit_hook,
            "model": str(source.loaded.spec), "source": source.describe, "n_tokens": stats.n_rows,
            "settings": cfg.identity()}
    norms = {h: w.norm(dim=-1) for h, w in blocks.items()} if len(blocks) > 1 else None
    write_site(out, cfg, stats, effects, neighbors, explanations, source.loaded.tokenizer, info, norms)
    return out
