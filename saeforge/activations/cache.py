"""The activation cache: harvest a model's activations to disk once, read them back many times.

Layout of a cache folder (see docs/cache.md for every manifest field)::

    out/manifest.json            what was harvested, how, and the list of finished shards
    out/shard_00000.safetensors  "acts.<hook>" [N, d] per hook, "token_id" int32 [N], "doc" int64 [N], "pos" int32 [N]
    out/shard_00001.safetensors  ...

Only positions whose packing ``keep`` mask is True are stored (no BOS / padding / special tokens by
default). A shard always covers a whole number of forward batches (``shard_batches`` of them), so the
shard boundaries and bytes depend only on the config, never on when a run was interrupted.

Crash safety: each shard is written atomically (temp file + rename), *then* the manifest is rewritten
atomically to list it. A rerun with the same config re-reads and re-packs the text (cheap), checks the
listed shards' checksums, skips the forward passes of the contexts they cover, and carries on. The
manifest holds no timestamps or absolute paths, so a resumed cache is byte-identical to one harvested
in a single run.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

import saeforge
from saeforge import distributed as dist
from saeforge import faults
from saeforge.config import JsonConfig
from saeforge.data.batches import context_batches
from saeforge.data.fingerprint import data_fingerprint
from saeforge.data.packing import ContextBatch
from saeforge.device import DTYPES, resolve_device
from saeforge.errors import CorruptFileError, NonFiniteError, SaeforgeError
from saeforge.hooks import capture, resolve_hook
from saeforge.io import save_safetensors_atomic, sha256_bytes, sha256_file, write_json_atomic
from saeforge.lock import LOCK_FILE, folder_lock
from saeforge.models import check_context_len, load_model

FORMAT = "saeforge-activation-cache/1"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
INCOMPLETE_HINT = "rerun `saeforge harvest` with the same arguments to finish it"
REPAIR_HINT = "rerun `saeforge harvest` with the same arguments to repair it (it redoes bad shards)"
NONFINITE_POLICIES = ("error", "skip")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
              "I64": torch.int64, "F64": torch.float64, "I16": torch.int16, "U8": torch.uint8, "I8": torch.int8}
# Read-time verification of shards (sha256 + finiteness). On by default; SAEFORGE_VERIFY_CACHE=0 turns it off
# (benchmarks/cache_verify.py measures what it costs).
VERIFY_READS = os.environ.get("SAEFORGE_VERIFY_CACHE", "1") not in ("0", "false", "no")


@dataclass
class HarvestConfig(JsonConfig):
    """What to harvest. Every field except ``out`` and ``device`` determines the cache's bytes."""

    model: str
    data: str
    hooks: list[str]
    out: str
    tokenizer: str | None = None
    text_field: str = "text"
    split: str = "train"
    context_len: int = 128
    batch_contexts: int = 32
    shard_tokens: int = 65536
    max_tokens: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    keep_special: bool = False
    on_nonfinite: str = "error"  # "error": refuse NaN/Inf rows, naming them; "skip": leave those rows out
    model_dtype: str = "float32"  # the model's weights (bfloat16/float16 for big models); changes the numbers
    device_map: str | None = None  # HF models: spread layers over the node's GPUs (e.g. "auto"); like device

    @property
    def torch_model_dtype(self) -> torch.dtype:
        if self.model_dtype not in DTYPES:
            raise SaeforgeError(f"unknown --model-dtype {self.model_dtype!r}; use float32, bfloat16 or float16")
        return DTYPES[self.model_dtype]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise SaeforgeError(f"--on-nonfinite {self.on_nonfinite!r}: use one of {', '.join(NONFINITE_POLICIES)}")
        if not self.hooks:
            raise SaeforgeError("no hooks given; pass --hooks, e.g. --hooks resid_post.2")
        if self.dtype not in STORE_DTYPES:
            raise SaeforgeError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(STORE_DTYPES)}")
        for name in ("context_len", "batch_contexts", "shard_tokens"):
            if getattr(self, name) < 1:
                raise SaeforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SaeforgeError(f"max_tokens must be positive or unset, got {self.max_tokens}")
        if len(set(self.hooks)) != len(self.hooks):
            raise SaeforgeError(f"hook list {self.hooks} repeats a name; give each hook once")

    @property
    def shard_batches(self) -> int:
        """Forward batches per shard: shard_tokens rounded to a whole number of batches (at least 1)."""
        return max(1, round(self.shard_tokens / (self.batch_contexts * self.context_len)))

    def identity(self) -> dict[str, Any]:
        """The fields that decide the cache contents (``out`` is where, ``device`` only how fast)."""
        d = self.to_dict()
        d.pop("out")
        d.pop("device")
        if d["on_nonfinite"] == "error":  # the default leaves the bytes of every earlier cache unchanged
            d.pop("on_nonfinite")
        d.pop("device_map")  # where the layers run, like device
        if d["model_dtype"] == "float32":  # the default: caches from before the option keep their identity
            d.pop("model_dtype")
        return d


# ----------------------------------------------------------------------------- shared with LiveStream


def forward_rows(
    model: torch.nn.Module,
    hook_points: list[Any],
    batch: ContextBatch,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One forward pass; returns the kept rows: ``acts.<hook>`` [N, d] (model dtype, CPU) and metadata."""
    tokens, doc, pos, keep = batch.tokens, batch.doc, batch.pos, batch.keep
    real = doc >= 0  # False only at padding of the final partial context
    mask = None if bool(real.all()) else real.long().to(device)
    with torch.no_grad():
        acts = capture(model, hook_points, tokens.to(device), attention_mask=mask, stop_early=True)
    # with a device_map each hook's activations live on its layer's GPU
    out = {f"acts.{h.name}": acts[h.name][keep.to(acts[h.name].device)].cpu() for h in hook_points}
    out["token_id"] = tokens[keep].to(torch.int32)
    out["doc"] = doc[keep].to(torch.int64)
    out["pos"] = pos[keep].to(torch.int32)
    return out


def nonfinite_rows(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [N]: rows where any hook's activation is NaN or infinite."""
    bad = torch.zeros(rows["token_id"].shape[0], dtype=torch.bool)
    for k, v in rows.items():
        if k.startswith("acts."):
            bad |= ~torch.isfinite(v).all(dim=-1)
    return bad


def refuse_or_skip_nonfinite(rows: dict[str, torch.Tensor], policy: str, data: str) -> dict[str, torch.Tensor]:
    """Refuse rows with NaN/Inf activations (naming their documents and positions), or drop them (``skip``)."""
    bad = nonfinite_rows(rows)
    if not bool(bad.any()):
        return rows
    if policy == "skip":
        return {k: v[~bad] for k, v in rows.items()}
    idx = torch.nonzero(bad).flatten()
    where = ", ".join(f"doc {int(rows['doc'][i])} pos {int(rows['pos'][i])}" for i in idx[:3])
    more = f" and {len(idx) - 3} more" if len(idx) > 3 else ""
    raise NonFiniteError(
        f"the model gave NaN/Inf activations on {len(idx)} rows of {data} ({where}{more}); nothing was stored "
        "for them; check the model and data, or pass --on-nonfinite skip to leave such rows out"
    )


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- writer


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("saeforge-toolkit")  # the distribution name (pyproject.toml)
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return str(getattr(saeforge, "__version__", "unknown"))


def _jsonable(spec: Any) -> Any:
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    return spec if isinstance(spec, (dict, list, str, int, float, bool, type(None))) else str(spec)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _check_folder(out: Path, cfg: HarvestConfig) -> dict[str, Any] | None:
    """Check ``out`` is new or a cache of this exact config (no side effects); return its manifest or None."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            old_cfg = old["config"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SaeforgeError(
                f"{manifest_path} is not a saeforge cache manifest; pick a new --out or delete the folder"
            ) from None
        new_cfg = cfg.identity()
        if old_cfg != new_cfg:
            diff = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
            shown = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in diff)
            raise SaeforgeError(
                f"{out} holds a cache harvested with a different config ({shown}); "
                "pick a new --out or delete the folder"
            )
        return old
    if out.exists():
        if not out.is_dir():
            raise SaeforgeError(f"--out {out} is a file; pass a folder path")
        if any(not (p.name.startswith("shard_") or p.name.endswith(".tmp") or p.name == LOCK_FILE)
               for p in out.iterdir()):
            raise SaeforgeError(f"--out {out} is not empty and not an activation cache; pick a new --out or empty it")
    return None


def _tidy(out: Path, old: dict[str, Any] | None) -> None:
    """Remove crash leftovers: temp files of interrupted atomic writes and shards the manifest never listed."""
    out.mkdir(parents=True, exist_ok=True)
    listed = {s["file"] for s in (old or {}).get("shards", [])}
    for p in out.iterdir():
        if p.name.endswith(".tmp") or (p.name.startswith("shard_") and p.name not in listed):
            p.unlink()


def _verified_prefix(out: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The listed shards up to the first one that is missing or fails its checksum (that one is redone)."""
    good = []
    for s in shards:
        f = out / s["file"]
        if not f.exists() or sha256_file(f) != s["sha256"]:
            break
        good.append(s)
    return good


def _with_last(it: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs (one item of look-ahead)."""
    prev = next(it, _END := object())
    if prev is _END:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _agree(fn: Any) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its SaeforgeError) to every process."""
    box: tuple[str, Any] = ("ok", None)
    if dist.rank() == 0:
        try:
            box = ("ok", fn())
        except SaeforgeError as err:
            box = ("error", (type(err), str(err)))
    box = dist.broadcast_object(box)
    if box[0] == "error":
        cls, msg = box[1]
        raise cls(msg)
    return box[1]


def harvest(cfg: HarvestConfig, progress: bool = True) -> Path:
    """Run the model over ``cfg.data`` and store the hooked activations in ``cfg.out``; returns the folder.

    Resumable: rerunning an interrupted harvest with the same config finishes it (see module docstring).
    A complete cache with the same config is left untouched.

    Under ``torchrun`` the shards are dealt round-robin: process ``r`` of ``W`` runs the forward passes of
    shards ``i ≡ r (mod W)`` and writes them; after every round of ``W`` shards rank 0 lists the round in
    the manifest. The shards depend only on the config, so the cache is byte-identical to a one-process
    harvest (given the same forward numerics: same device kind and thread count), and the manifest only
    ever lists a prefix of finished shards, so a harvest killed on any rank resumes with any number of
    processes. Rank 0 alone checks the folder, holds the lock and writes the manifest.
    """
    cfg.validate()
    out = Path(cfg.out)
    dist.init(cfg.device)
    # refuse a foreign folder before the lock puts its file into it
    _agree(lambda: None if (out / MANIFEST).exists() else _check_folder(out, cfg))
    with folder_lock(out, "harvest"):
        return _harvest_locked(cfg, out, progress)


def _check_data(out: Path, old: dict[str, Any] | None, fingerprint: dict[str, Any]) -> None:
    """Refuse to continue a cache whose input data changed since it was started."""
    if old is None or old.get("data_fingerprint") in (None, fingerprint):
        return
    raise SaeforgeError(
        f"--data changed since {out} was harvested from it (fingerprint {old['data_fingerprint'].get('sha256', '?')[:12]}"
        f" -> {fingerprint.get('sha256', '?')[:12]}); resuming would stitch old and new text into one cache: "
        "restore the original data, or harvest into a new --out"
    )


def _harvest_locked(cfg: HarvestConfig, out: Path, progress: bool) -> Path:
    from tqdm.auto import tqdm

    W, me = dist.world_size(), dist.rank()

    def check() -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool, dict[str, Any]]:
        old = _check_folder(out, cfg)
        fingerprint = data_fingerprint(cfg.data)
        _check_data(out, old, fingerprint)
        shards = _verified_prefix(out, old["shards"]) if old else []
        return old, shards, bool(old and old.get("complete") and len(shards) == len(old["shards"])), fingerprint

    old, shards, done, fingerprint = _agree(check)
    if done:
        return out  # already finished: nothing to do

    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, tokenizer=cfg.tokenizer, device=device, dtype=cfg.torch_model_dtype,
                        device_map=cfg.device_map)
    if cfg.device_map is not None:
        device = loaded.device  # inputs go where the embedding is
    check_context_len(loaded, cfg.context_len)
    hook_points = [resolve_hook(loaded, h) for h in cfg.hooks]
    names = [hp.name for hp in hook_points]  # canonical spellings (e.g. "mod:input" -> "mod:in")
    if len(set(names)) != len(names):
        raise SaeforgeError(f"hooks {cfg.hooks} name the same hook point twice; give each once")
    batches = context_batches(loaded.tokenizer, cfg.data, context_len=cfg.context_len,
                              batch_size=cfg.batch_contexts, text_field=cfg.text_field, split=cfg.split,
                              keep_special=cfg.keep_special, max_tokens=cfg.max_tokens)
    first = next(batches, None)  # surfaces data errors before anything is written
    if first is None:
        raise SaeforgeError(
            f"{cfg.data} gave no context of {cfg.context_len} tokens; use more text or a smaller --context-len"
        )
    if old:
        old = {**old, "shards": shards}
    store_dtype = STORE_DTYPES[cfg.dtype]
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "saeforge_version": _version(),
        "config": cfg.identity(),
        "model": {"family": loaded.family, "spec": _jsonable(loaded.spec),
                  "d_model": loaded.d_model, "n_layers": loaded.n_layers},
        "hooks": names,
        "d": dict(old.get("d", {})) if old else {},
        "dtype": cfg.dtype,
        "context_len": cfg.context_len,
        "batch_contexts": cfg.batch_contexts,
        "shard_batches": cfg.shard_batches,
        "data": cfg.data,
        "data_fingerprint": fingerprint,
        "n_tokens": 0,
        "n_contexts": 0,
        "shards": shards,
        "complete": False,
    }

    def write_manifest() -> None:
        manifest["n_tokens"] = sum(s["rows"] for s in shards)
        manifest["n_contexts"] = sum(s["n_contexts"] for s in shards)
        write_json_atomic(out / MANIFEST, manifest)

    if me == 0:
        _tidy(out, old)
        write_manifest()
    dist.barrier()  # leftovers are gone before anyone writes a shard
    sb = cfg.shard_batches
    skip_batches = len(shards) * sb
    bar = tqdm(total=cfg.max_tokens, initial=manifest["n_tokens"], unit="tok", unit_scale=True,
               desc=f"harvest {out.name}", disable=not progress or me != 0)
    pending: list[dict[str, torch.Tensor]] = []
    pending_contexts = 0
    done_round: list[tuple[int, dict[str, Any]]] = []  # this process's finished shards of the current round
    d_seen: dict[str, int] = {}

    def write_shard(i: int) -> None:
        nonlocal pending, pending_contexts
        rows = _concat(pending)
        tensors = {k: (v.to(store_dtype) if k.startswith("acts.") else v).contiguous() for k, v in rows.items()}
        name = _shard_name(i)
        data = save_safetensors_atomic(out / name, tensors)
        done_round.append((i, {"file": name, "rows": int(rows["token_id"].shape[0]), "sha256": sha256_bytes(data),
                               "n_contexts": pending_contexts}))
        pending, pending_contexts = [], 0

    def end_round() -> None:
        """Every process: hand this round's shards to rank 0, which lists them in order."""
        mine = (list(done_round), dict(d_seen))
        done_round.clear()
        parts = dist.all_gather_object(mine)
        if me != 0:
            return
        for h in names:
            for _, d in parts:
                if h in d:
                    manifest["d"].setdefault(h, d[h])
        for _, e in sorted((x for part, _ in parts for x in part), key=lambda x: x[0]):
            first_context = manifest["n_contexts"]
            shards.append({"file": e["file"], "rows": e["rows"], "sha256": e["sha256"],
                           "first_context": first_context, "n_contexts": e["n_contexts"]})
            bar.update(e["rows"])
            write_manifest()
            faults.point("harvest:shard")

    try:
        for b, (batch, last) in enumerate(_with_last(itertools.chain([first], batches))):
            if b < skip_batches:
                continue
            i = b // sb
            if i % W == me:
                rows = refuse_or_skip_nonfinite(forward_rows(loaded.model, hook_points, batch, device),
                                                cfg.on_nonfinite, cfg.data)
                for h in names:
                    d_seen.setdefault(h, int(rows[f"acts.{h}"].shape[-1]))
                pending.append(rows)
                pending_contexts += int(batch.tokens.shape[0])
            if b % sb == sb - 1 or last:  # shard i is complete
                if pending:
                    write_shard(i)
                if i % W == W - 1 or last:
                    end_round()
    finally:
        bar.close()
    if me == 0:
        manifest["complete"] = True
        write_manifest()
    dist.barrier()  # the cache is complete before any process returns
    return out


# ----------------------------------------------------------------------------- reader


class ActivationCache:
    """Read-only view of a complete cache folder: the manifest plus one shard at a time."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise SaeforgeError(
                f"{self.path} is not an activation cache (no {MANIFEST}); create one with `saeforge harvest`"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CorruptFileError(f"{mpath} is not valid JSON; {INCOMPLETE_HINT}") from None
        if not isinstance(self.manifest, dict):
            raise CorruptFileError(f"{mpath} is not a cache manifest; {INCOMPLETE_HINT}")
        if self.manifest.get("format") != FORMAT:
            raise SaeforgeError(
                f"{mpath} has format {self.manifest.get('format')!r}, expected {FORMAT!r}; harvest it again"
            )
        if not self.manifest.get("complete"):
            raise SaeforgeError(
                f"activation cache {self.path} is incomplete ({len(self.manifest['shards'])} shards so far); "
                + INCOMPLETE_HINT
            )
        try:
            self.hooks: list[str] = list(self.manifest["hooks"])
            self.d: dict[str, int] = {h: int(self.manifest["d"][h]) for h in self.hooks}
            self.n_tokens: int = int(self.manifest["n_tokens"])
            self.n_shards: int = len(self.manifest["shards"])
            self.dtype: torch.dtype = STORE_DTYPES[self.manifest["dtype"]]
            for entry in self.manifest["shards"]:
                entry["file"], entry["sha256"], entry["rows"]  # noqa: B018 - every shard entry is complete
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{mpath} is damaged (bad or missing {e}); {REPAIR_HINT}") from None
        self.verify_reads = VERIFY_READS

    @property
    def model_spec(self) -> str | None:
        """The model the cache was harvested from; a local path is made absolute (valid from any folder)."""
        spec = self.manifest.get("config", {}).get("model")
        if isinstance(spec, str) and Path(spec).expanduser().exists():
            return str(Path(spec).expanduser().resolve())
        return spec

    def content_id(self) -> str:
        """A digest of what the cache holds: its config and the checksums of its shards."""
        body = json.dumps([self.manifest.get("config"), [s["sha256"] for s in self.manifest["shards"]]])
        return sha256_bytes(body.encode())

    def __len__(self) -> int:
        return self.n_tokens

    def shard_rows(self, i: int) -> int:
        return int(self.manifest["shards"][i]["rows"])

    def check_hooks(self, hooks: list[str] | None) -> list[str]:
        """``hooks`` (all of the cache's when None), after checking the cache holds each of them."""
        hooks = list(self.hooks if hooks is None else hooks)
        missing = [h for h in hooks if h not in self.d]
        if missing:
            raise SaeforgeError(f"hooks {missing} are not in cache {self.path} (it has {self.hooks}); pick from those")
        return hooks

    def shard(self, i: int, hooks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Load shard ``i`` (only the given hooks' activations if ``hooks`` is set) into CPU memory."""
        if not 0 <= i < self.n_shards:
            raise SaeforgeError(f"shard index {i} out of range; the cache has {self.n_shards} shards")
        hooks = self.check_hooks(hooks)
        entry = self.manifest["shards"][i]
        f = self.path / entry["file"]
        if not f.exists():
            raise SaeforgeError(f"{f} is missing; {INCOMPLETE_HINT} (it re-creates missing shards)")
        keys = [f"acts.{h}" for h in hooks] + ["token_id", "doc", "pos"]
        if self.verify_reads:
            out = self._verified_shard(f, entry, keys)
        else:
            with safe_open(f, framework="pt") as fh:
                out = {k: fh.get_tensor(k) for k in keys}
        if out["token_id"].shape[0] != entry["rows"]:
            raise SaeforgeError(
                f"{f} has {out['token_id'].shape[0]} rows, manifest says {entry['rows']}; {INCOMPLETE_HINT}"
            )
        return out

    def _verified_shard(self, f: Path, entry: dict[str, Any], keys: list[str]) -> dict[str, torch.Tensor]:
        """Read a shard once into memory, check its sha256 against the manifest, hand out zero-copy views of
        the wanted tensors, and check the activations for NaN/Inf (benchmarks/cache_verify.py: the cost)."""
        import hashlib

        buf = bytearray(f.stat().st_size)
        with open(f, "rb") as fh:
            got = fh.readinto(buf)
        if got != len(buf) or hashlib.sha256(buf).hexdigest() != entry["sha256"]:
            raise CorruptFileError(f"{f} fails its checksum (damaged on disk); {REPAIR_HINT}")
        try:
            n = int.from_bytes(buf[:8], "little")
            header = json.loads(bytes(buf[8:8 + n]))
            out = {}
            for k in keys:
                spec = header[k]
                dtype = _ST_DTYPES[spec["dtype"]]
                lo, hi = spec["data_offsets"]
                count = (hi - lo) // dtype.itemsize
                flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + lo) if count else \
                    torch.empty(0, dtype=dtype)
                out[k] = flat.view(spec["shape"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CorruptFileError(f"{f} is not a readable cache shard ({e}); {REPAIR_HINT}") from None
        for k in keys:
            # a float sum is non-finite when any element is (or, in theory, on overflow): exact check only then
            if k.startswith("acts.") and not bool(torch.isfinite(out[k].sum())) and not bool(torch.isfinite(out[k]).all()):
                raise NonFiniteError(f"{f} holds NaN/Inf activations in {k}; harvest again (harvest refuses them, "
                                     "or drops them with --on-nonfinite skip)")
        return out

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; raise naming the first bad shard."""
        for entry in self.manifest["shards"]:
            f = self.path / entry["file"]
            if not f.exists():
                raise SaeforgeError(f"{f} is missing; {INCOMPLETE_HINT} (it re-creates missing shards)")
            if sha256_file(f) != entry["sha256"]:
                raise SaeforgeError(f"{f} fails its checksum (corrupted); {INCOMPLETE_HINT} (it redoes bad shards)")
