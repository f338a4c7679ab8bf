"""What a run leaves behind: metrics.jsonl, results.json, tracker streams and reports."""
