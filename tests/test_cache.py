"""Activation cache: contents against a direct forward pass, manifest, checksums, crash-safe resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeforge.activations.cache import ActivationCache, HarvestConfig, harvest
from saeforge.errors import SaeforgeError

REPO = Path(__file__).resolve().parents[1]
HOOKS = ["resid_post.2", "mlp_out.1"]
MAX_TOKENS = 3000


def _cfg(model, data, out, **kw) -> HarvestConfig:
    base = dict(model=str(model), data=str(data), hooks=list(HOOKS), out=str(out), context_len=32,
                batch_contexts=8, shard_tokens=512, max_tokens=MAX_TOKENS)
    return HarvestConfig(**{**base, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, stories_model_path, tinystories_train):
    out = tmp_path_factory.mktemp("cache") / "acts"
    harvest(_cfg(stories_model_path, tinystories_train, out), progress=False)
    return out


def test_rows_equal_a_direct_forward_pass(cache_dir, stories_model_path, tinystories_train):
    from saeforge.data import iter_documents, pack
    from saeforge.hooks import capture, resolve_hook
    from saeforge.models import load_model

    cache = ActivationCache(cache_dir)
    lm = load_model(str(stories_model_path))
    tok = lm.tokenizer
    n_ctx = cache.manifest["n_contexts"]
    ctxs = [c for _, c in zip(range(n_ctx), pack(iter_documents(str(tinystories_train)), tok, context_len=32))]
    tokens = torch.stack([c.tokens for c in ctxs])
    # independent keep rule: every token that is not a special id, in reading order, first MAX_TOKENS of them
    keep = ~torch.isin(tokens, torch.tensor(sorted(tok.special_ids)))
    assert int(keep.sum()) >= MAX_TOKENS
    ref = capture(lm, [resolve_hook(lm, h) for h in HOOKS], tokens, stop_early=False)
    rows = [cache.shard(i) for i in range(cache.n_shards)]
    got = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    assert got["token_id"].shape == (MAX_TOKENS,)
    assert torch.equal(got["token_id"].long(), tokens[keep][:MAX_TOKENS])
    for h in HOOKS:
        assert got[f"acts.{h}"].dtype == torch.float32
        torch.testing.assert_close(got[f"acts.{h}"], ref[h][keep][:MAX_TOKENS], rtol=1e-5, atol=1e-5)
    # doc/pos point back at the token: encode(document)[pos] == token_id
    docs = list(zip(range(int(got["doc"].max()) + 1), iter_documents(str(tinystories_train))))
    encoded = [tok.encode(text) for _, text in docs]
    for r in range(0, MAX_TOKENS, 7):
        assert encoded[int(got["doc"][r])][int(got["pos"][r])] == int(got["token_id"][r])


def test_manifest_fields_and_checksums(cache_dir, stories_model_path, tinystories_train):
    m = json.loads((cache_dir / "manifest.json").read_text())
    cache = ActivationCache(cache_dir)
    assert m["complete"] is True and m["hooks"] == HOOKS and m["d"] == {h: 64 for h in HOOKS}
    assert m["dtype"] == "float32" and m["context_len"] == 32 and m["model"]["d_model"] == 64
    assert m["shard_batches"] == 2  # 512 rows / (8 contexts x 32 tokens)
    assert cache.n_tokens == MAX_TOKENS == sum(s["rows"] for s in m["shards"])
    firsts = [s["first_context"] for s in m["shards"]]
    assert firsts == [16 * i for i in range(len(firsts))]  # every shard but the last covers 2 x 8 contexts
    assert sum(s["n_contexts"] for s in m["shards"]) == m["n_contexts"]
    assert [s["file"] for s in m["shards"]] == [f"shard_{i:05d}.safetensors" for i in range(cache.n_shards)]
    assert str(cache_dir) not in json.dumps(m)  # location-independent: no out path, no timestamps
    cache.verify()
    bad = cache_dir.parent / "corrupt"
    shutil.copytree(cache_dir, bad)
    f = bad / "shard_00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(SaeforgeError, match="shard_00001.*checksum"):
        ActivationCache(bad).verify()
    # rerunning harvest repairs the corrupt shard (and redoes the ones after it)
    harvest(_cfg(stories_model_path, tinystories_train, bad), progress=False)
    assert _files(bad) == _files(cache_dir)


@pytest.mark.slow  # a subprocess that imports torch + transformers
def test_killed_harvest_resumes_byte_identical(cache_dir, tmp_path, stories_model_path, tinystories_train):
    """SIGKILL the harvest while shard 3 sits fully written in its temp file, then rerun to completion."""
    out = tmp_path / "acts"
    cfg = _cfg(stories_model_path, tinystories_train, out)
    cfg.save(tmp_path / "cfg.json")
    script = (
        "import os, signal, sys\n"
        "from saeforge.activations.cache import HarvestConfig, harvest\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('shard_00003.safetensors'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.replace = replace\n"
        "harvest(HarvestConfig.load(sys.argv[1]), progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.json")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".tmp") for n in names)  # the crash left a temp file behind
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 3
    with pytest.raises(SaeforgeError, match="incomplete.*rerun `saeforge harvest`"):
        ActivationCache(out)
    harvest(cfg, progress=False)
    assert _files(out) == _files(cache_dir)


def test_crash_between_shard_and_manifest(cache_dir, tmp_path, stories_model_path, tinystories_train):
    """State after a crash right after a shard's rename: the shard exists but the manifest does not list it."""
    out = tmp_path / "acts"
    shutil.copytree(cache_dir, out)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"], m["complete"] = m["shards"][:2], False
    (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    (out / "shard_00004.safetensors").write_bytes(b"garbage from a torn write")
    harvest(_cfg(stories_model_path, tinystories_train, out), progress=False)
    assert _files(out) == _files(cache_dir)


def test_rerun_complete_is_noop_and_config_change_refused(cache_dir, stories_model_path, tinystories_train,
                                                          monkeypatch):
    import saeforge.models

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache_dir.iterdir()}
    monkeypatch.setattr(saeforge.models, "load_model", lambda *a, **k: pytest.fail("model loaded on a no-op"))
    harvest(_cfg(stories_model_path, tinystories_train, cache_dir), progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache_dir.iterdir()} == before
    with pytest.raises(SaeforgeError) as e:
        harvest(_cfg(stories_model_path, tinystories_train, cache_dir, context_len=64), progress=False)
    msg = str(e.value)
    assert "context_len: 32 -> 64" in msg and "new --out" in msg and "\n" not in msg


def test_foreign_folder_and_bad_input(tmp_path, stories_model_path, tinystories_train):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SaeforgeError, match="not empty"):
        harvest(_cfg(stories_model_path, tinystories_train, tmp_path), progress=False)
    with pytest.raises(SaeforgeError, match="dtype"):
        harvest(_cfg(stories_model_path, tinystories_train, tmp_path / "x", dtype="int8"), progress=False)
    with pytest.raises(SaeforgeError, match="does not exist"):
        harvest(_cfg(stories_model_path, tmp_path / "missing.txt", tmp_path / "y"), progress=False)
    assert not (tmp_path / "y").exists()  # nothing written before the data was found
    with pytest.raises(SaeforgeError, match="not an activation cache"):
        ActivationCache(tmp_path)


def test_cli_and_half_precision(cache_dir, tmp_path, stories_model_path, tinystories_train, capsys):
    """The CLI (repeated --hooks) gives the same bytes; bf16 storage holds the fp32 rows rounded."""
    from saeforge.cli import main

    argv = ["harvest", "--model", str(stories_model_path), "--data", str(tinystories_train), "--hooks",
            "resid_post.2", "--hooks", "mlp_out.1", "--context-len", "32", "--batch-contexts", "8",
            "--shard-tokens", "512", "--max-tokens", str(MAX_TOKENS), "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "cli")]) == 0
    assert f"harvested {MAX_TOKENS} tokens" in capsys.readouterr().out
    assert _files(tmp_path / "cli") == _files(cache_dir)
    cfg = _cfg(stories_model_path, tinystories_train, tmp_path / "bf16", dtype="bfloat16", max_tokens=400,
               hooks=["resid_post.2"])
    half = ActivationCache(harvest(cfg, progress=False))
    full = ActivationCache(cache_dir)
    a = half.shard(0)["acts.resid_post.2"]
    assert a.dtype == torch.bfloat16
    ref = full.shard(0, ["resid_post.2"])["acts.resid_post.2"][: len(a)]
    torch.testing.assert_close(a.float(), ref, rtol=2**-8, atol=1e-6)  # bf16 keeps 8 significant bits
