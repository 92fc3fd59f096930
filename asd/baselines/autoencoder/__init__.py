"""The official DCASE 2023-2025 Task 2 autoencoder baseline, trained with Ray Train.

Published description followed here: N. Harada, D. Niizumi, Y. Ohishi, D. Takeuchi and
M. Yasuda, "First-shot anomaly sound detection for machine condition monitoring: a domain
generalization baseline", arXiv:2303.00455 (2023), the baseline of DCASE 2023 Task 2, kept as
the baseline of DCASE 2024 and 2025 Task 2 (T. Nishida et al., "Description and discussion on
DCASE 2024/2025 challenge task 2"); its public code is ``nttcslab/dcase2023_task2_baseline_ae``
(``baseline.yaml``, ``networks/dcase2023t2_ae``, ``networks/criterion/mahala.py``). This file
is our own implementation of that description:

* **Front end**: 16 kHz audio, 1024-point FFT, hop 512, 128 mel bins, power spectrum (power 2),
  ``10 * log10``; a *context vector* is 5 consecutive frames concatenated (640 values, frame
  after frame), taken at every frame (hop 1).
* **Network** (:class:`AENet`): encoder 640-128-128-128-128-8, decoder 8-128-128-128-128-640;
  every Linear except the last is followed by ``BatchNorm1d(momentum=0.01, eps=1e-3)`` and ReLU
  (the 8-unit bottleneck too). Loss: MSE between a context vector and its reconstruction.
  Official training: Adam, learning rate 1e-3, batches of 256 vectors, 100 epochs, one model
  per machine type on that type's normal training clips (source and target domain).
* **AE-MSE score** of a clip: the mean squared reconstruction error over all its context
  vectors.
* **AE-Mahalanobis score** ("selective Mahalanobis"): after training, the reconstruction errors
  of the training clips, cut into 128-value rows (one per frame of each context vector), give one
  covariance matrix for the source-domain and one for the target-domain training clips (the
  source one is used for target when a type has no target training clips, as the official code
  does). A clip's score is the smaller of its source and target Mahalanobis terms. The official
  code evaluates ``mean_ij(d_i^T P d_j)`` over all error rows of a clip, which equals
  ``dbar^T P dbar`` with ``dbar`` the clip's mean error row; that is ``maha_reduction =
  "mean_error"`` (default). ``"mean_distance"`` averages the per-row terms ``d_i^T P d_i``
  instead (the textbook reading), for comparison.
* **Decision threshold**: the 0.9 quantile of a gamma distribution fitted to training scores.

Where this implementation differs, and why:

* **Front end through the featurize stage.** The stored project features are Kaldi fbank at
  25 ms / 10 ms, which cannot give a 1024-point spectrum, so the baseline's own front end is a
  *second feature set*: :func:`featurize_frontend` runs the ordinary featurize stage (Ray Data,
  quarantine, incremental by content hash) with frame length 64 ms (1024 samples, hence a
  1024-point FFT) and shift 32 ms (512 samples) into ``<root>/baselines/ae/``. That is Kaldi's
  filterbank, not librosa's: HTK mel spacing from 20 Hz with unit-peak triangles (librosa: Slaney
  spacing, area-normalised, from 0 Hz), pre-emphasis 0.97, per-frame DC removal, a symmetric Hann
  window, no centre padding (two frames fewer per clip), and the natural log of the power of the
  int16-scaled waveform, which we turn into decibels (``x * 10 / ln 10``). Per-bin gains and
  constant offsets (filter normalisation, the 2**15 scale and, approximately, pre-emphasis, whose
  gain varies inside a band) only shift each input bin by a constant, which the first BatchNorm
  removes after the first Linear and the last bias learns at the output; the mel spacing and the
  window are the real differences.
* **One scalar subtracted.** The decibel values have the type's training mean (one number over
  all bins and frames of its training clips) subtracted, so a short training does not spend its
  steps moving the output bias by tens of dB. A constant offset is absorbed by the first
  BatchNorm and the output bias, so the model class is unchanged.
* **One Ray Train run for all types.** The official recipe runs one training per machine type.
  Here every type's autoencoder is trained side by side in one :func:`asd.training.fit.fit` run
  (:class:`AEBank`: independent networks; a clip goes only through its own type's network and the
  loss is the sum of the per-type mean errors, so each network gets exactly the gradient it would
  get alone, and Adam's state is per parameter). The models are still one per type; the reason is
  cost: each Ray Train run pays a start-up of 30-50 s on a small machine, once per run instead of
  once per type.
* **Training budget and batches.** :func:`asd.training.fit.fit` feeds random crops of clips
  (:class:`asd.training.batches.FeatureBatches`): per type, a batch holds about 22 clips x 16 frames = 22 x 12
  context vectors (264, close to the official 256); the default is 1000 steps, far fewer than 100
  epochs over every vector of a full DCASE type. Adam's settings are kept (lr 1e-3, no weight
  decay, no warm-up, constant rate, no clipping). The official 10 % validation hold-out only
  monitors the loss; it is not kept.
* **BatchNorm statistics recomputed before export.** With momentum 0.01 the running statistics
  need thousands of steps to reach the training-set statistics that 100 epochs end at; a short
  run would score with half-initial statistics. After training they are recomputed as plain
  averages over random batches of training vectors (standard BN recalibration,
  ``recalibrate_bn``).
* **Covariance.** A centred sample covariance over all error rows of a domain, plus a ridge of
  ``maha_ridge`` x the mean variance on the diagonal so that a small domain stays invertible
  (the official code centres per batch, divides by the number of vectors rather than rows, and
  inverts without a ridge: the same matrix up to a scale and the batch centring).
* **Thresholds** are fitted on per-clip training scores (the official fit uses per-batch losses).

Outputs: ``<root>/baselines/ae/features`` (the front end), ``<root>/baselines/ae/train_view``
(the training clips' rows as a feature view, what Ray Train reads; see
:func:`asd.stores.features.write_feature_view`), ``<root>/checkpoints/<tag>`` (Ray Train checkpoints)
and, published atomically (staging folder, then ``_SUCCESS``), ``<root>/models/<tag>/``:
``config.json`` (front end, architecture, per-type offset, thresholds, training summary),
``<type>/autoencoder.pt`` (weights) and ``<type>/mahalanobis.npz`` (source and target
covariances and their inverses).
:func:`score_autoencoders` scores clips with a Ray Data actor pool and returns the score table of
:mod:`asd.stages.score` (``SCORE_SCHEMA``) for each score, so :func:`asd.stages.score.write_results` writes the
same DCASE CSVs, metrics and report as the kNN scoring.
"""

from asd.baselines.autoencoder.model import AEConfig, AENet, TypeModel, default_train_config
from asd.baselines.autoencoder.runner import (
    featurize_frontend,
    run_baseline,
    train_autoencoders,
)
from asd.baselines.autoencoder.scoring import load_autoencoders, score_autoencoders

__all__ = ["AEConfig", "AENet", "TypeModel", "default_train_config", "featurize_frontend", "load_autoencoders",
           "run_baseline", "score_autoencoders", "train_autoencoders"]
