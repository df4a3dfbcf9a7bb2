"""``saeforge push RUN REPO_ID`` / ``saeforge.push``: publish an SAE folder on the Hugging Face Hub.

RUN is a folder saeforge reads as an SAE (a training run's output, or any format ``load_sae`` detects). Before
uploading, RUN gets:

* ``README.md``, a model card: architecture, widths, model, hook (saeforge and TransformerLens names), the
  headline metrics from ``RUN/eval.json`` when present, and how to load the SAE with saeforge and SAELens. A
  README.md that saeforge did not write is kept as it is;
* ``saelens/``, the same SAE in SAELens's layout (``saeforge.formats.save_sae_as``), so SAELens users load it
  with ``SAE.from_pretrained(REPO_ID, "saelens")`` (SAELens treats an unknown release as a Hub repo id). An
  architecture SAELens cannot hold is uploaded without it.

The folder then goes up with ``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder`` (token, endpoint
and cache from huggingface_hub's own settings: ``HF_TOKEN``, ``huggingface-cli login``). Resume state and locks
never go up (:data:`IGNORE`). ``dry_run`` writes the card (and the SAELens copy) and lists what would be
uploaded, without calling the Hub.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeforge.errors import SaeforgeError
from saeforge.formats.common import read_json
from saeforge.hooknames import to_transformerlens
from saeforge.io import write_text_atomic
from saeforge.formats import save_sae_as
from saeforge.formats import load_sae

CARD = "README.md"
SAELENS_DIR = "saelens"
MARKER = "<!-- written by saeforge push, which rewrites this card; delete this line to keep your edits -->"
# never uploaded: training/eval resume state, locks, temporary and hidden files
IGNORE = ["checkpoint.safetensors", "eval_state.json", ".saeforge.lock", "*.tmp", ".*", "*/.*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# (card label, path in eval.json) -- the headline numbers of saeforge eval (docs/eval.md)
METRICS = [
    ("L0 (mean active latents)", "reconstruction.l0"),
    ("FVU", "reconstruction.fvu"),
    ("explained variance", "reconstruction.explained_variance"),
    ("cosine similarity", "reconstruction.cos_sim"),
    ("dead latents (fraction)", "features.dead_frac"),
    ("CE loss, clean", "downstream.ce_clean"),
    ("CE loss, SAE spliced", "downstream.ce_spliced"),
    ("ΔCE (nats)", "downstream.delta_ce"),
    ("CE recovered", "downstream.ce_recovered"),
    ("KL divergence", "downstream.kl"),
]


@dataclass
class PushResult:
    repo_id: str
    folder: Path
    files: list[str]  # relative paths uploaded (or that would be, with dry_run)
    card: Path
    saelens: bool  # whether a SAELens copy is included
    dry_run: bool
    url: str | None = None
    notes: list[str] = field(default_factory=list)


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _eval_metrics(run: Path) -> list[tuple[str, Any]]:

    path = run / "eval.json"
    if not path.exists():
        return []
    res = read_json(path)
    if "saes" in res and "reconstruction" not in res:  # a multi-SAE eval.json: not this folder's numbers
        return []
    return [(label, _get(res, key)) for label, key in METRICS if _get(res, key) is not None]


def model_card(sae: Any, repo_id: str, metrics: list[tuple[str, Any]], saelens: bool) -> str:
    """The README.md text for ``sae`` published as ``repo_id``."""

    c = sae.cfg
    front = ["---", "library_name: saeforge", "tags:", "- sparse-autoencoder", "- saeforge", f"- {c.arch}"]
    if saelens:
        front.append("- sae_lens")
    if c.model and _REPO_ID.match(str(c.model)):
        front.append(f"base_model: {c.model}")
    front.append("---")
    tl = to_transformerlens(c.hook)
    hook = f"`{c.hook}`" + (f" (TransformerLens `{tl}`)" if tl and tl != c.hook else "") if c.hook else "not recorded"
    widths = f"d_in = {c.d_in}, d_sae = {c.d_sae}" + (f", d_out = {c.d_out}" if c.d_out != c.d_in else "")
    lines = [*front, "", MARKER, "", f"# {repo_id.split('/')[-1]}", "",
             f"A **{c.arch}** sparse {'transcoder' if c.is_transcoder else 'autoencoder'} ({widths}) made with "
             "[saeforge](https://pypi.org/project/saeforge-toolkit/).", "",
             "| | |", "|---|---|", f"| model | `{c.model or 'not recorded'}` |", f"| hook | {hook} |"]
    if c.target_hook and c.target_hook != c.hook:
        lines.append(f"| target hook | `{c.target_hook}` |")
    spec = sae.export_spec()
    if spec is not None and spec.k is not None:
        lines.append(f"| k | {spec.k} |")
    if spec is not None and spec.groups:
        lines.append(f"| Matryoshka groups | {', '.join(str(g) for g in spec.groups)} |")
    lines.append(f"| input normalisation | {c.input_norm} |")
    lines.append("")
    if metrics:
        lines += ["## Evaluation", "", "From `eval.json` (`saeforge eval`; definitions in saeforge's docs/eval.md).",
                  "", "| metric | value |", "|---|---|", *[f"| {label} | {_fmt(v)} |" for label, v in metrics], ""]
    lines += ["## Use it", "", "With saeforge (`pip install saeforge-toolkit`):", "", "```python",
              "import saeforge", "", f'sae = saeforge.load_sae("{repo_id}")', "codes = sae.encode(activations)",
              "reconstruction = sae.decode(codes)", "```", "", "```bash",
              f"saeforge eval --sae {repo_id}" + (f" --model {c.model}" if c.model else ""), "```", ""]
    if saelens:
        lines += ["With SAELens (the `saelens/` folder holds the same SAE in its layout):", "", "```python",
                  "from sae_lens import SAE", "", f'sae = SAE.from_pretrained("{repo_id}", "{SAELENS_DIR}")',
                  "```", ""]
    return "\n".join(lines)


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def upload_list(folder: Path, ignore: list[str] | None = None) -> list[str]:
    """The files ``upload_folder(folder, ignore_patterns=ignore)`` sends (huggingface_hub's fnmatch rules)."""
    patterns = IGNORE if ignore is None else ignore
    return sorted(rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                  if not _ignored(rel, patterns))


def _write_card(run: Path, text: str, notes: list[str]) -> Path:

    card = run / CARD
    if card.exists() and MARKER not in card.read_text(encoding="utf-8", errors="replace"):
        notes.append(f"kept {card} (not written by saeforge push)")
        return card
    write_text_atomic(card, text)
    return card


def _saelens_copy(sae: Any, run: Path, notes: list[str]) -> bool:
    if (sae.cfg.metadata or {}).get("source_format") == "saelens" and (run / "cfg.json").exists() and \
            (run / "sae_weights.safetensors").exists():
        return False  # RUN is itself a SAELens folder: SAE.from_pretrained(REPO_ID, "") reads it already
    try:
        save_sae_as(sae, run / SAELENS_DIR, "saelens")
    except SaeforgeError as err:
        notes.append(f"no SAELens copy: {err}")
        return False
    return True


def push(run: str | Path, repo_id: str, *, dry_run: bool = False, private: bool = False,
         revision: str | None = None, commit_message: str | None = None, saelens: bool = True,
         token: str | None = None) -> PushResult:
    """Write the model card (and SAELens copy) into ``run`` and upload the folder to ``repo_id``."""

    run = Path(run).expanduser()
    if not run.is_dir():
        raise SaeforgeError(f"{run} is not a folder; pass the SAE folder to push (e.g. the --out of saeforge train)")
    if not _REPO_ID.match(repo_id or ""):
        raise SaeforgeError(f"REPO_ID {repo_id!r} is not a Hub repo id; use owner/name (e.g. you/my-sae)")
    sae = load_sae(run)
    notes: list[str] = []
    has_saelens = _saelens_copy(sae, run, notes) if saelens else False
    card = _write_card(run, model_card(sae, repo_id, _eval_metrics(run), has_saelens), notes)
    files = upload_list(run)
    result = PushResult(repo_id, run, files, card, has_saelens, dry_run, notes=notes)
    if dry_run:
        return result
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or f"Upload {sae.cfg.arch} SAE with saeforge"
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(run), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, ignore_patterns=list(IGNORE))
    except Exception as err:  # auth, network, permissions: one line naming the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaeforgeError(f"could not upload {run} to {repo_id} ({first}); log in with `huggingface-cli login` "
                            "or set HF_TOKEN to a token with write access") from None
    result.url = str(info) if info is not None else None
    return result
