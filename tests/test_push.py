"""``saeforge push RUN REPO_ID`` and ``saeforge.push``: the model card, the SAELens copy, the upload calls.

huggingface_hub's ``HfApi.create_repo`` / ``upload_folder`` are replaced by recorders: no network."""
from __future__ import annotations

import json

import pytest
import torch

import saeforge
from saeforge.cli import main as cli_main
from saeforge.errors import SaeforgeError
from saeforge.formats import load_sae
from saeforge.sae import create_sae, make_config


@pytest.fixture
def run(tmp_path):
    sae = create_sae(make_config("topk", d_in=32, d_sae=128, k=4, hook="resid_post.1", model="openai-community/gpt2"))
    out = sae.save(tmp_path / "run")
    (out / "checkpoint.safetensors").write_bytes(b"resume state")  # never uploaded
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "eval.json").write_text(json.dumps({
        "reconstruction": {"l0": 4.0, "fvu": 0.1234, "explained_variance": 0.8766},
        "features": {"dead_frac": 0.05},
        "downstream": {"ce_clean": 3.1, "ce_spliced": 3.3, "delta_ce": 0.2, "ce_recovered": 0.9}}))
    return out


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw))
        return f"https://huggingface.co/{kw['repo_id']}/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_dry_run_writes_the_card_and_lists_files(run, hub, capsys):
    assert cli_main(["push", str(run), "me/tiny-topk", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub == []  # no Hub call
    card = (run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saeforge") and "base_model: openai-community/gpt2" in card
    assert "`resid_post.1` (TransformerLens `blocks.1.hook_resid_post`)" in card
    assert "| FVU | 0.1234 |" in card and "| CE recovered | 0.9 |" in card and "| k | 4 |" in card
    assert 'saeforge.load_sae("me/tiny-topk")' in card and 'SAE.from_pretrained("me/tiny-topk", "saelens")' in card
    for name in ("README.md", "cfg.json", "sae.safetensors", "eval.json", "metrics.jsonl",
                 "saelens/cfg.json", "saelens/sae_weights.safetensors"):
        assert f"  {name}  (" in out, name
    assert "checkpoint.safetensors" not in out and ".saeforge.lock" not in out
    # the SAELens copy is the same SAE, in SAELens's layout
    x = torch.randn(8, 32)
    a, b = load_sae(run), load_sae(run / "saelens")
    assert b.cfg.metadata["source_format"] == "saelens"
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_push_creates_the_repo_and_uploads_the_folder(run, hub):
    res = saeforge.push(run, "me/tiny-topk", private=True, commit_message="first")
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1] == {"repo_id": "me/tiny-topk", "repo_type": "model", "private": True, "exist_ok": True}
    up = hub[1][1]
    assert up["folder_path"] == str(run) and up["repo_id"] == "me/tiny-topk" and up["commit_message"] == "first"
    assert "checkpoint.safetensors" in up["ignore_patterns"]
    assert res.url.endswith("/commit/abc") and "README.md" in res.files and res.saelens
    assert "checkpoint.safetensors" not in res.files


def test_a_readme_the_user_wrote_is_kept(run, hub):
    (run / "README.md").write_text("# my own card\n")
    res = saeforge.push(run, "me/x", dry_run=True)
    assert (run / "README.md").read_text() == "# my own card\n" and any("kept" in n for n in res.notes)


def test_push_errors_are_one_line(run, tmp_path, hub, monkeypatch, capsys):
    assert cli_main(["push", str(tmp_path / "nope"), "me/x"]) == 2
    assert cli_main(["push", str(run), "not a repo id"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "owner/name" in err

    import huggingface_hub

    def refuse(self, **kw):
        raise RuntimeError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(SaeforgeError, match="HF_TOKEN") as e:
        saeforge.push(run, "me/x")
    assert "\n" not in str(e.value) and "401" in str(e.value)


def test_an_architecture_saelens_cannot_hold_is_pushed_without_the_copy(tmp_path, hub):
    sae = create_sae(make_config("crosscoder", d_in=64, d_sae=128, hooks=["resid_post.0", "resid_post.1"]))
    run = sae.save(tmp_path / "cc")
    res = saeforge.push(run, "me/cc", dry_run=True)
    assert not res.saelens and not (run / "saelens").exists() and any("no SAELens copy" in n for n in res.notes)
    assert "sae_lens" not in (run / "README.md").read_text()


def test_saelens_loads_the_pushed_copy(run, hub):
    sae_lens = pytest.importorskip("sae_lens")
    saeforge.push(run, "me/tiny-topk", dry_run=True)
    theirs = sae_lens.SAE.load_from_disk(str(run / "saelens"), device="cpu")
    x = torch.randn(8, 32)
    ours = load_sae(run)
    with torch.no_grad():
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours(x), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
