"""Statistics over evaluation results (per-question, across runs and seeds)."""
