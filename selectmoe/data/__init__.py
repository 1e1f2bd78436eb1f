"""Pool data: canonical records, readers, ingest/validation, THE chat encoder, Ray Data I/O, corruptions,
and the generated demo pool. Submodules import lazily (``from selectmoe.data.encoding import ...``)."""

from selectmoe.data.encoding import IGNORE_INDEX, ChatEncoder, Encoded, EncodingSpec, pad_batch, pad_columns
from selectmoe.data.records import canonical_messages, stable_id

__all__ = [
    "IGNORE_INDEX",
    "ChatEncoder",
    "Encoded",
    "EncodingSpec",
    "canonical_messages",
    "pad_batch",
    "pad_columns",
    "stable_id",
]
