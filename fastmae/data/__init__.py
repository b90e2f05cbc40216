"""Data loading: DALI and torch pipelines, sources, sharding, resumable position."""
