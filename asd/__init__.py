"""asd: distributed anomalous sound detection for machine sounds on Ray."""

__version__ = "0.1.0"

SAMPLE_RATE = 16_000
