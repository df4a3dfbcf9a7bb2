"""Text input and packing: documents in, fixed-length token contexts out, batched as :class:`ContextBatch`."""
from saeforge.data.batches import context_batches, documents, first_contexts
from saeforge.data.packing import Context, ContextBatch, batch_contexts, pack
from saeforge.data.text import iter_documents

__all__ = ["Context", "ContextBatch", "batch_contexts", "context_batches", "documents", "first_contexts",
           "iter_documents", "pack"]
