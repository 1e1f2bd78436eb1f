"""The score stage's model replica: :class:`RouterScorer` applies THE scoring function to pyarrow batches.

Test hook: ``SELECTMOE_SCORE_CRASH_ONCE=<marker>`` (read on the driver, passed as ``crash_once_marker``)
makes a replica hard-exit (``os._exit``, like a killed actor) on its first batch if ``<marker>`` does not
exist yet (it is created first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selectmoe.data.encoding import pad_columns
from selectmoe.router_data import PROMPT_KEY, TEXT_COLUMNS
from selectmoe.scoring.model import answer_only_nll, resolve_dtype, score_batch

logger = logging.getLogger(__name__)

CRASH_ONCE_ENV = "SELECTMOE_SCORE_CRASH_ONCE"
SHARD_COLUMN = "_shard"  # each row's ingest shard, carried through the pipeline to the driver's writers


class RouterScorer:
    """``map_batches`` callable class: one model replica (an actor) scoring pyarrow batches."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        use_gpu: bool = False,
        num_threads: int | None = None,
        crash_once_marker: str | None = None,
        hidden_dim: int = 0,
    ):
        import torch

        from selectmoe.scoring.features import projection_matrix

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.dtype = resolve_dtype(dtype, use_gpu)
        self.crash_once_marker = crash_once_marker
        self.model, tokenizer = self._load(model_dir)
        self.model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.scope = getattr(self.model.config, "quality_token_scope", "all")
        # hidden_dim > 0: store the pooled hidden state, JL-projected to hidden_dim when the model is wider
        self.hidden = int(hidden_dim) > 0
        size = int(self.model.get_output_embeddings().in_features)
        self.projection = projection_matrix(size, int(hidden_dim)) if self.hidden else None
        if self.projection is not None:
            self.projection = self.projection.to(self.device)

    def _load(self, model_dir: str):
        from selectmoe.scoring.loading import load_scorer

        return load_scorer(model_dir, dtype=self.dtype, device=self.device)

    def _padded(self, batch: pa.Table, ids_col: str, labels_col: str):
        """Right-padded ``(input_ids, attention_mask, labels)`` tensors of two list columns, on the device."""
        tensors = pad_columns(batch.column(ids_col), batch.column(labels_col), self.pad_id)
        nb = self.device.type == "cuda"
        return tuple(
            tensors[k].to(self.device, non_blocking=nb) for k in ("input_ids", "attention_mask", "labels")
        )

    def tensors(self, batch: pa.Table):
        return self._padded(batch, "input_ids", "labels")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_once_marker and not os.path.exists(self.crash_once_marker):
            Path(self.crash_once_marker).touch()
            logger.warning("test hook: scorer replica exits hard (simulated kill)")
            os._exit(1)
        input_ids, attention_mask, labels = self.tensors(batch)
        response = None
        if "response_labels" in batch.column_names:
            response = self._padded(batch, "input_ids", "response_labels")[2]
        stats = score_batch(
            self.model,
            input_ids,
            attention_mask,
            labels,
            scope=self.scope,
            response_labels=response,
            hidden=self.hidden,
            hidden_projection=self.projection,
        )
        n = batch.num_rows
        ifd = np.full(n, np.nan, np.float32)
        if "answer_input_ids" in batch.column_names:
            # IFD = L(A|Q) / L(A): > 1 means the question does not help predict the answer (misaligned).
            ifd = stats["response_nll"] / answer_only_nll(
                self.model, *self._padded(batch, "answer_input_ids", "answer_labels")
            )
        columns = {
            "id": batch.column("id"),
            "dataset": batch.column("dataset"),
            "n_tokens": pc.cast(batch.column("n_tokens"), pa.int32()),
            "truncated": batch.column("truncated"),
            "full_tokens": pc.cast(batch.column("full_tokens"), pa.int32()),
            SHARD_COLUMN: batch.column(SHARD_COLUMN),
            "response_nll": pa.array(stats["response_nll"].astype(np.float32)),
            "sample_nll": pa.array(stats["sample_nll"].astype(np.float32)),
            "ifd": pa.array(ifd.astype(np.float32)),
        }
        for name in (*TEXT_COLUMNS, PROMPT_KEY):  # computed by the encode tasks (scoring/dataset.py)
            if name in batch.column_names:
                columns[name] = batch.column(name)
        if "quality" in stats:  # a Select-MoE's gate; no column at all for a model without one
            columns["quality"] = pa.array(stats["quality"].astype(np.float32))
            columns["quality_layers"] = _fixed(stats["quality_layers"].astype(np.float32), pa.float32())
        if "routing" in stats:
            columns["routing"] = _fixed(stats["routing"].reshape(n, -1).astype(np.float16), pa.float16())
        if "hidden" in stats:
            columns["hidden"] = _fixed(stats["hidden"].astype(np.float16), pa.float16())
        return pa.table(columns)


def _fixed(values: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    """``[B, K]`` numpy -> Arrow ``fixed_size_list<type>[K]``."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type_), values.shape[1])
