"""`ray job submit` entrypoints: thin wrappers that parse config and call the pipeline."""
