"""Data layer: DCASE names and attributes, listing (local/s3), decoding, synthetic corpora."""
