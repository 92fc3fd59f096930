"""The two stores keyed by clip: featurized clips (:mod:`.features`) and embeddings
(:mod:`.embeddings`)."""
