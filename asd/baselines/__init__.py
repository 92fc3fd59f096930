"""Comparison methods from the literature, implemented on the project's own machinery.

* :mod:`asd.baselines.autoencoder`: the official DCASE 2023-2025 Task 2 autoencoder baseline
  (log-mel 5-frame context vectors, dense AE, MSE and selective-Mahalanobis scores), trained
  with :func:`asd.training.fit.fit` (Ray Train).
"""
