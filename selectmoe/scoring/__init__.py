"""Scoring: THE scoring function, the quality probe, and the score stage's pieces (replica, Ray Data
pipeline, shard records, driver-side writer). Below the stages: imports data, model, selection only."""
