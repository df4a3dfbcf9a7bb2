"""Text input and packing: documents in, fixed-length token contexts out."""
from saeforge.data.packing import Context, batch_contexts, pack
from saeforge.data.text import iter_documents

__all__ = ["Context", "batch_contexts", "iter_documents", "pack"]
