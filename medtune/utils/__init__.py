"""The bottom layer: JSONL files, errors and the one entry wrapper, process groups (no upward imports)."""
