"""SQuAD-style answer normalisation, exact match and token F1 for the TyDiQA-GoldP task (max over golds)."""

import collections
import re
import string


def answers(doc):
    raw = doc.get("answers", [])
    if isinstance(raw, dict):
        raw = raw.get("text", [])
    return [a["text"] if isinstance(a, dict) else str(a) for a in raw] or [""]


def first_answer(doc):
    return answers(doc)[0]


def _normalize(text):
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction, gold):
    pred, ref = _normalize(prediction).split(), _normalize(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if not pred or not ref:
        return float(pred == ref)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc, results):
    prediction = results[0].strip()
    golds = answers(doc)
    return {
        "exact_match": max(float(_normalize(prediction) == _normalize(g)) for g in golds),
        "f1": max(_f1(prediction, g) for g in golds),
    }
