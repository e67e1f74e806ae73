"""The asv suite's side of the harness: its size profiles, the facts asv does not record, reading asv's results,
and the asv plugins asv.conf.json names."""
