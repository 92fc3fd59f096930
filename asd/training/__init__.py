"""Training on a Ray cluster, for every training stage: the loop and its config (:mod:`.loop`), feature
rows to batches (:mod:`.batches`), augmentations (:mod:`.augment`), Ray Train's run (:mod:`.fit`),
training checkpoints (:mod:`.checkpoints`) and test-only fault injection (:mod:`.faults`)."""
