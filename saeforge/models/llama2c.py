"""Load a llama2.c checkpoint (``run.c`` "version 0" format) as a Hugging Face ``LlamaForCausalLM``.

Running llama2.c models through ``transformers`` means every other part of saeforge (hooks, harvesting,
splicing) sees one kind of model. The file layout (see ``/work/shared/models/stories260K/README.md`` and
``checkpoint_init_weights`` in llama2.c's run.c): 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; negative vocab_size = separate classifier), then float32 arrays.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saeforge.errors import SaeforgeError
from saeforge.models.tokenizer import Llama2cTokenizer
from saeforge.io import write_bytes_atomic

HEADER_BYTES = 28
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c export.py version 1/2 files


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    def n_floats(self) -> int:
        """Number of float32 values after the header, per run.c's ``memory_map_weights``."""
        d, h, L, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        n = v * d + L * d + L * d * d + 2 * L * kv * d + L * d * d + L * d + 3 * L * h * d + d
        n += self.seq_len * self.head_size  # freq_cis_real + freq_cis_imag, [seq_len, head_size/2] each
        if not self.shared_classifier:
            n += v * d
        return n


def read_header(path: str | Path) -> Llama2cHeader | None:
    """Parse the header, or return None if the file is not a plausible llama2.c v0 checkpoint (size must match)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except OSError:
        return None
    if len(raw) < HEADER_BYTES:
        return None
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0:
        return None
    if dim % heads or heads % kv_heads or (dim // heads) % 2:
        return None
    hdr = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)
    if size != HEADER_BYTES + 4 * hdr.n_floats():
        return None
    return hdr


def is_llama2c_checkpoint(path: str | Path) -> bool:
    return read_header(path) is not None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved RoPE pairs (llama2.c / Meta: dims 0,1 / 2,3 ...) -> HF's rotate-half layout (i, i + head/2).

    Same as ``permute_original`` in llama2.c's export.py (``hf_export``).
    """
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def load_llama2c(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Read a llama2.c v0 ``.bin`` into an eval-mode ``LlamaForCausalLM`` with gradients off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not path.is_file():
        raise SaeforgeError(f"llama2.c checkpoint not found: {path}; check the model path")
    hdr = read_header(path)
    if hdr is None:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if len(magic) == 4 and struct.unpack("<I", magic)[0] == _V1_MAGIC:
            raise SaeforgeError(f"{path} is a llama2.c version-1/2 export; re-export it with `export.py --version 0`")
        raise SaeforgeError(f"{path} is not a llama2.c v0 checkpoint (header/size mismatch); pass a llama2.c .bin or a HF folder")

    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER_BYTES).astype(np.float32))
    d, h, L, v, kv = hdr.dim, hdr.hidden_dim, hdr.n_layers, hdr.vocab_size, hdr.kv_dim
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos : pos + n].view(*shape)
        pos += n
        return out

    emb = take(v, d)
    rms_att, wq, wk = take(L, d), take(L, d, d), take(L, kv, d)
    wv, wo, rms_ffn = take(L, kv, d), take(L, d, d), take(L, d)
    w1, w2, w3 = take(L, h, d), take(L, d, h), take(L, h, d)
    rms_final = take(d)
    take(hdr.seq_len, hdr.head_size)  # RoPE cos/sin tables; HF recomputes them from rope_theta
    wcls = emb if hdr.shared_classifier else take(v, d)

    config = LlamaConfig(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=h,
        num_hidden_layers=L,
        num_attention_heads=hdr.n_heads,
        num_key_value_heads=hdr.n_kv_heads,
        max_position_embeddings=hdr.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=hdr.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": wcls}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "self_attn.q_proj.weight"] = permute_to_hf(wq[i], hdr.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_to_hf(wk[i], hdr.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]

    model = LlamaForCausalLM(config)
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [k for k in params if k not in sd]
        if missing:
            raise SaeforgeError(f"llama2.c loader does not know HF parameters {missing[:3]}; report this transformers version")
        for k, t in params.items():
            t.copy_(sd[k])
    if model.generation_config is not None:
        model.generation_config.pad_token_id = 2
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), hdr


def find_tokenizer(model_path: str | Path, vocab_size: int | None = None) -> Path:
    """The llama2.c tokenizer next to a checkpoint: ``tokenizer.bin`` or ``tok*.bin`` with a matching vocab size."""

    folder = Path(model_path).resolve().parent
    cands = sorted({*folder.glob("tok*.bin"), *folder.glob("tokenizer.bin")})
    cands = [c for c in cands if c.resolve() != Path(model_path).resolve()]
    if vocab_size is not None:
        ok = []
        for c in cands:
            try:
                if Llama2cTokenizer(c).vocab_size == vocab_size:
                    ok.append(c)
            except SaeforgeError:
                pass
        cands = ok
    if not cands:
        raise SaeforgeError(
            f"no llama2.c tokenizer (tokenizer.bin or tok*.bin, {vocab_size} tokens) next to {model_path}; pass --tokenizer PATH"
        )
    return cands[0]


def save_hf(loaded, folder: str | Path) -> Path:
    """Write a loaded model as a Hugging Face folder (``config.json`` + safetensors) that ``load_model`` reads back.

    ``save_pretrained`` writes through its own temp files; the folder is complete once this returns. The
    llama2.c tokenizer is copied alongside as ``tokenizer.bin`` (HF has no class for it), so pass
    ``tokenizer=folder/tokenizer.bin`` when loading the folder.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    tok = loaded.tokenizer
    if isinstance(tok, Llama2cTokenizer):
        write_bytes_atomic(folder / "tokenizer.bin", tok.path.read_bytes())
    elif hasattr(tok, "hf"):
        tok.hf.save_pretrained(folder)
    return folder
