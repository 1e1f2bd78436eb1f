"""The small vocabulary the scoring tests build their tokenizer and rows from (one list for every test)."""

WORDS = [
    *("the", "a", "model", "data", "router", "expert", "token", "gate", "quality", "score", "sample"),
    *("answer", "question", "why", "how"),
]
