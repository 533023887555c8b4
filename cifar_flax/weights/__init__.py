"""Pretrained weights: the release registry (registry), file readers + download (files), strict
conversion into the Flax ResNet50 (convert), converted weights on disk and the cache (store),
feature extraction (features) and the ``convert``/``features`` command line (cli)."""
