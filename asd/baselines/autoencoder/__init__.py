"""The official DCASE 2023-2025 Task 2 autoencoder baseline, as published, on Ray.

Published recipe followed here: N. Harada, D. Niizumi, Y. Ohishi, D. Takeuchi and M. Yasuda,
"First-shot anomaly sound detection for machine condition monitoring: a domain generalization
baseline", arXiv:2303.00455 (2023), the baseline of DCASE 2023 Task 2 and kept for 2024 and 2025;
its public code is ``nttcslab/dcase2023_task2_baseline_ae`` (``baseline.yaml``,
``datasets/loader_common.py``, ``networks/dcase2023t2_ae``, ``networks/criterion/mahala.py``,
librosa 0.9.2). This package is our own implementation of it:

* **Front end** (``FbankConfig(kind="librosa")``, :func:`asd.data.frontend.compute_mel_db`):
  librosa's ``melspectrogram`` at 16 kHz, ``n_fft`` 1024, hop 512, 128 mel bins, power 2 (centred
  frames with reflect padding, periodic Hann window, Slaney mel filters from 0 Hz to 8 kHz with
  Slaney normalisation), then ``10 * log10(max(mel, eps))``; a *context vector* is 5 consecutive
  frames concatenated (640 values, frame after frame), taken at every frame. It runs as the
  ordinary featurize stage (Ray Data, quarantine, incremental by content hash) into a second
  feature set, ``<root>/baselines/ae/`` (:func:`featurize_frontend`).
* **Network** (:class:`AENet`): encoder 640-128-128-128-128-8, decoder 8-128-128-128-128-640;
  every Linear except the last is followed by ``BatchNorm1d(momentum=0.01, eps=1e-3)`` and ReLU.
* **Training** (:func:`asd.baselines.autoencoder.model.train_type`), one model per machine type
  on its normal training clips (both domains): every context vector of every clip, 10 % of them
  held out at random (their loss is reported, never trained on), 100 epochs over the rest in
  shuffled batches of 256, Adam at 1e-3, the mean squared error; seed 13711. The types train in
  parallel, one Ray task each (:func:`train_autoencoders`).
* **AE-MSE score** of a clip: the mean squared reconstruction error over all its context vectors.
* **AE-Mahalanobis score** ("selective Mahalanobis"): the reconstruction errors of the training
  clips, cut into 128-value rows, give one covariance for the source-domain and one for the
  target-domain training clips (the source one stands for the target when a type has no target
  training clips, as the official code does); a clip's score is the smaller of its two terms
  ``dbar^T P dbar``, ``dbar`` its mean error row (``maha_reduction = "mean_error"``, the official
  computation; ``"mean_distance"`` averages the per-row terms instead, for comparison).
* **Decision threshold**: the 0.9 quantile of a gamma distribution fitted to training scores.

Where it differs from the official code, and why (none of it changes how clips rank):

* The front end is computed with torch (``torch.stft`` and torchaudio's Slaney filter bank), not
  librosa, which the project does not depend on; ``tests/test_autoencoder.py`` checks it against
  an independent numpy implementation of librosa 0.9's algorithm.
* The covariances are the centred sample covariances of all error rows of a domain, plus a ridge
  of ``maha_ridge`` x the mean variance on the diagonal so that a small domain stays invertible
  (the official code centres per batch and divides by the number of vectors rather than rows:
  the same matrix up to a scale and the batch centring).
* Thresholds are fitted on per-clip training scores (the official fit uses per-batch losses).
* A last batch of one vector in an epoch is left out (BatchNorm needs two rows).

Outputs: ``<root>/baselines/ae/features`` (the front end) and, published atomically (staging
folder, then ``_SUCCESS``), ``<root>/models/<tag>/``: ``config.json`` (settings, per-type training
record with the loss history, thresholds), ``<type>/autoencoder.pt`` and ``<type>/mahalanobis.npz``.
:func:`score_autoencoders` scores clips with a Ray Data actor pool and returns the score tables of
:mod:`asd.stages.score` (``SCORE_SCHEMA``), so :func:`asd.stages.score.write_results` writes the
same DCASE CSVs, metrics and report as the kNN scoring.
"""

from asd.baselines.autoencoder.model import AEConfig, AENet, TypeModel, train_type
from asd.baselines.autoencoder.runner import (
    featurize_frontend,
    run_baseline,
    train_autoencoders,
)
from asd.baselines.autoencoder.scoring import load_autoencoders, score_autoencoders

__all__ = ["AEConfig", "AENet", "TypeModel", "featurize_frontend", "load_autoencoders", "run_baseline",
           "score_autoencoders", "train_autoencoders", "train_type"]
