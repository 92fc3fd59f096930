"""Detectors as data: a recipe names the labels, models and embedding of one detector (:mod:`.recipe`);
:mod:`.run` runs recipes through the stages; :mod:`.evaluate` compares recipes and the baselines on
one split (:mod:`.split`) and :mod:`.report` writes what they show."""
