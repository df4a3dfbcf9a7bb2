"""Fast sparse kernels for SAE training: exact chunked TopK / AuxK / BatchTopK encoding with sparse
gradients, sparse decoding, and allocation-free decoder-row constraints. Torch code everywhere,
Triton on CUDA when it is installed.

See docs/performance.md for where a training step spends its time and how these change it.
"""
from saeforge.kernels.allocator import tune_cpu_allocator
from saeforge.kernels.rows import normalize_rows_, remove_parallel_component_
from saeforge.kernels.select import topk_rows
from saeforge.kernels.sparse_ops import gather_dots, gather_sum, index_sum, scatter_rows
from saeforge.kernels.topk_autograd import (
    SparseDecode,
    SparseEncode,
    TopKCodes,
    batch_topk_encode,
    dense_to_sparse,
    release_workspace,
    set_chunk_elements,
    sparse_decode,
    topk_encode,
)
from saeforge.kernels.sparse_losses import fired_latents, sparse_auxk_loss

__all__ = [
    "tune_cpu_allocator", "normalize_rows_", "remove_parallel_component_", "topk_rows", "gather_dots",
    "gather_sum", "index_sum", "scatter_rows", "SparseDecode", "SparseEncode", "TopKCodes", "batch_topk_encode",
    "dense_to_sparse", "release_workspace", "set_chunk_elements", "sparse_decode", "topk_encode",
    "fired_latents", "sparse_auxk_loss",
]
