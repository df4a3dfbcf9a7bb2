"""Fast sparse kernels for SAE training: exact chunked TopK / AuxK / BatchTopK encoding with sparse
gradients, and sparse decoding. Torch code everywhere, Triton on CUDA when it is installed.

See docs/performance.md for where a training step spends its time and how these change it.
"""
from saeforge.kernels.select import topk_rows
from saeforge.kernels.sparse_ops import gather_dots, gather_sum, index_sum, scatter_rows
from saeforge.kernels.topk_autograd import (
    SparseDecode,
    SparseEncode,
    TopKCodes,
    batch_topk_encode,
    dense_to_sparse,
    sparse_decode,
    topk_encode,
)

__all__ = [
    "topk_rows", "gather_dots", "gather_sum", "index_sum", "scatter_rows", "SparseDecode", "SparseEncode",
    "TopKCodes", "batch_topk_encode", "dense_to_sparse", "sparse_decode", "topk_encode",
]
