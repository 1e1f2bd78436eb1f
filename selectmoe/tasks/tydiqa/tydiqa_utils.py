"""TyDiQA-GoldP for the LESS protocol: the official SQuAD-layout files flattened per language, and the
SQuAD v1.1 exact match / token F1 (max over the gold answers) that LESS computes with ``evaluate``'s
``squad`` metric (lowercase, strip punctuation and English articles, split on whitespace)."""

import collections
import re
import string
from functools import partial

import datasets

_PUNCT = set(string.punctuation)


def process_docs(dataset, lang):
    """One row per question of ``lang`` (the id prefix, ``finnish-...``): id, context, question, answers."""
    rows = [
        {
            "id": qa["id"],
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [a["text"] for a in qa["answers"]],
        }
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
        if qa["id"].split("-")[0] == lang
    ]
    if not rows:
        raise ValueError(
            f"TyDiQA-GoldP: no {lang} questions (ids '{lang}-...') in this split of the data file"
        )
    return datasets.Dataset.from_list(rows)


process_docs_ar = partial(process_docs, lang="arabic")
process_docs_bn = partial(process_docs, lang="bengali")
process_docs_en = partial(process_docs, lang="english")
process_docs_fi = partial(process_docs, lang="finnish")
process_docs_id = partial(process_docs, lang="indonesian")
process_docs_ko = partial(process_docs, lang="korean")
process_docs_ru = partial(process_docs, lang="russian")
process_docs_sw = partial(process_docs, lang="swahili")
process_docs_te = partial(process_docs, lang="telugu")


def normalize_answer(text):
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction, gold):
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def process_results(doc, results):
    prediction = results[0].strip()
    golds = doc["answers"]
    return {
        "exact_match": max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds),
        "f1": max(f1_score(prediction, g) for g in golds),
    }
