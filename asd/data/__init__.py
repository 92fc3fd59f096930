"""Audio in: DCASE names and values (:mod:`.dcase`), decoding (:mod:`.audio`), listing a corpus
(:mod:`.manifest`), the front ends (:mod:`.frontend`) and generated corpora (:mod:`.synthetic`,
:mod:`.realistic` with its sound models in :mod:`.machines`)."""
