"""LESS's BBH scoring: the answer after "So the answer is" (else the raw output's first paragraph),
exact match with case and punctuation ignored (HF ``evaluate``'s exact_match, ignore_case/punctuation)."""

import re
import string

_ANSWER = re.compile(r"So the answer is (.*?)\.")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def extract_answer(output):
    found = _ANSWER.search(output)
    if found:
        return found.group(1).strip()
    return output.strip().split("\n\n")[0].strip()


def _canonical(text):
    return text.lower().translate(_NO_PUNCT)


def process_results(doc, results):
    return {"exact_match": float(_canonical(extract_answer(results[0])) == _canonical(doc["target"]))}
