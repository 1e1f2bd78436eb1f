"""The label-free quality probe: can the selector tell held-out clean samples from corrupted twins?

From ``n`` clean samples it builds one corrupted twin per sample for each corruption in
:data:`selectmoe.data.corruptions.CORRUPTIONS` (``swap_response`` takes the response of *another* held-out
sample as donor), scores clean and corrupted samples with the model using exactly the scoring definition
(:func:`selectmoe.scoring.model.score_batch`: mean over layers of the token-mean gate ``g`` over
``token_mask_for_scope(model.config.quality_token_scope)``, same :class:`ChatEncoder` and EncodingSpec),
and reports

- ``probe_auc``: the **unpaired** ROC AUC (sklearn) of the gate over all clean vs all corrupted scores,
  ``P(score(clean) > score(corrupt)) + 0.5 * P(tie)``;
- ``per_corruption[kind]``: the same AUC of all clean vs that corruption's twins;
- ``paired_win_rate``: the share of (clean, its own twin) pairs the clean sample wins (ties 0.5);
- ``scorers[name]``: every scorer's AUC (gate, response/sample NLL of the same pass, IFD, and the
  combinations), overall and per corruption, so the gate is judged next to the free perplexity baseline.

0.5 = no signal; 1.0 = every clean sample scores above every corrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selectmoe.data.corruptions import CORRUPTIONS, corrupt


def build_probe_set(records: Sequence[Mapping[str, Any]], *, seed: int) -> list[dict[str, Any]]:
    """``[{"pair": i, "kind": "clean" | <corruption>, "messages": [...]}, ...]``: each record plus one twin per
    corruption. Records without an assistant turn are skipped. Deterministic given ``seed``."""
    usable = [r for r in records if any(m.get("role") == "assistant" for m in r["messages"])]
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for i, rec in enumerate(usable):
        items.append({"pair": i, "kind": "clean", "messages": rec["messages"]})
        for kind in CORRUPTIONS:
            donor = None
            if kind == "swap_response":
                if len(usable) < 2:
                    continue
                j = rng.randrange(len(usable) - 1)
                donor = usable[j if j < i else j + 1]  # another held-out sample
            twin = corrupt({"messages": rec["messages"]}, kind, rng, donor=donor)
            items.append({"pair": i, "kind": kind, "messages": twin["messages"]})
    return items


def score_messages_all(model, encoder, conversations, *, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Every stored per-sample score of ``conversations`` (``quality``, ``response_nll``, ``sample_nll``,
    ``ifd``): THE scoring function, batched by length, response labels from the same text as the score
    stage, and IFD's answer-only pass as the score stage runs it with ``score.ifd=true``."""
    import torch

    from selectmoe.data.encoding import ChatEncoder, pad_batch
    from selectmoe.scoring.model import answer_only_nll, assistant_only, response_spec, score_batch

    conversations = list(conversations)
    encoded = encoder.encode_many(conversations)
    response_encoder = ChatEncoder(encoder.tokenizer, response_spec(encoder.spec.to_dict()))
    response = response_encoder.encode_many(conversations)
    answers = response_encoder.encode_many([assistant_only(c) for c in conversations])
    scope = getattr(model.config, "quality_token_scope", "all")
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k].input_ids))
    columns = ("quality", "response_nll", "sample_nll")
    out = {c: np.zeros(len(encoded), dtype=np.float64) for c in (*columns, "ifd")}
    pad_id = encoder.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = encoder.tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([encoded[k] for k in idx], pad_id).items()}
        resp = pad_batch([response[k] for k in idx], pad_id)["labels"].to(device)
        with torch.no_grad():
            stats = score_batch(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"], scope=scope,
                response_labels=resp,
            )  # fmt: skip
            answer = {k: v.to(device) for k, v in pad_batch([answers[k] for k in idx], pad_id).items()}
            answer_nll = answer_only_nll(
                model, answer["input_ids"], answer["attention_mask"], answer["labels"]
            )
        for c in columns:
            out[c][idx] = stats[c]
        out["ifd"][idx] = stats["response_nll"] / answer_nll
    return out


def score_messages(model, encoder, conversations, *, batch_size: int = 16) -> np.ndarray:
    """Per-sample gate quality scores of ``conversations`` (see :func:`score_messages_all`)."""
    return score_messages_all(model, encoder, conversations, batch_size=batch_size)["quality"]


def probe(model, encoder, items: Sequence[Mapping[str, Any]], *, batch_size: int = 16) -> dict[str, Any]:
    """AUCs of a probe set (see module docstring) for ``model`` (put in eval mode by the caller).

    ``probe_auc`` / ``per_corruption`` / ``paired_win_rate`` are the gate's (the Tune metric); ``scorers``
    holds every scorer's AUC overall and per corruption (:func:`selectmoe.selection.scorers.scorer_aucs`),
    so the gate is always seen next to the base model's perplexity."""
    from selectmoe.selection.scorers import scorer_aucs

    columns = score_messages_all(model, encoder, [it["messages"] for it in items], batch_size=batch_size)
    scores = columns["quality"]
    kinds = np.array([it["kind"] for it in items])
    pairs = np.array([it["pair"] for it in items])
    clean = scores[kinds == "clean"]
    clean_by_pair = {int(p): s for p, s, k in zip(pairs, scores, kinds, strict=True) if k == "clean"}
    wins = []  # each twin against its own clean sample
    for s, p, k in zip(scores, pairs, kinds, strict=True):
        if k != "clean":
            c = clean_by_pair[int(p)]
            wins.append(1.0 if c > s else 0.5 if c == s else 0.0)
    scorers = scorer_aucs(columns, kinds)
    gate = scorers.get("gate", {})
    return {
        "probe_auc": gate.get("overall", float("nan")),
        "per_corruption": {kind: gate[kind] for kind in CORRUPTIONS if kind in gate},
        "paired_win_rate": float(np.mean(wins)) if wins else float("nan"),
        "scorers": scorers,
        "n_clean": int(clean.size),
        "n_corrupt": int((kinds != "clean").sum()),
        "clean_mean": float(clean.mean()) if clean.size else float("nan"),
        "corrupt_mean": float(scores[kinds != "clean"].mean()) if (kinds != "clean").any() else float("nan"),
        "auc_kind": "ROC AUC (sklearn) over all clean vs all corrupted scores (unpaired)",
    }


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """``probe_auc`` + ``probe_auc_<kind>`` + ``probe_paired_win_rate`` (the gate) and
    ``probe_<scorer>_auc`` (every scorer, overall) for ``ray.train.report``."""
    out = {"probe_auc": float(result["probe_auc"]), "probe_paired_win_rate": float(result["paired_win_rate"])}
    out.update({f"probe_auc_{k}": float(v) for k, v in result["per_corruption"].items()})
    out.update({f"probe_{name}_auc": float(v["overall"]) for name, v in result.get("scorers", {}).items()})
    return out


class ProbeEval:
    """``LoopSpec.eval_fn``: the probe on held-out records (picklable; tokenizer + twins built lazily)."""

    def __init__(
        self, records: Sequence[Mapping[str, Any]], tokenizer_dir: str, encoding: Mapping[str, Any], seed: int
    ):
        self.records = [{"messages": list(r["messages"])} for r in records]
        self.tokenizer_dir = str(tokenizer_dir)
        self.encoding = dict(encoding)
        self.seed = int(seed)
        self._state = None

    def __getstate__(self):
        return {**self.__dict__, "_state": None}

    def _build(self):
        if self._state is None:
            from transformers import AutoTokenizer

            from selectmoe.data.encoding import ChatEncoder, EncodingSpec
            from selectmoe.storage import local_copy

            tok = AutoTokenizer.from_pretrained(local_copy(self.tokenizer_dir))
            self._state = (
                ChatEncoder(tok, EncodingSpec.from_dict(self.encoding)),
                build_probe_set(self.records, seed=self.seed),
            )
        return self._state

    def full(self, model) -> dict[str, Any]:
        encoder, items = self._build()
        return probe(model, encoder, items)

    def __call__(self, model) -> dict[str, float]:
        if not self.records:
            return {}
        return flat_metrics(self.full(model))


__all__ = [
    "ProbeEval",
    "build_probe_set",
    "flat_metrics",
    "probe",
    "score_messages",
    "score_messages_all",
]
