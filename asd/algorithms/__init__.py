"""Numeric algorithms over embedding matrices, with no Ray and no storage: kNN memory banks
(:mod:`.knn`), decision thresholds (:mod:`.thresholds`) and Ward clustering (:mod:`.ward`)."""
