"""Pretrained weights: the release registry (registry), file readers + download (files), strict
conversion into the Flax ResNet50 (convert), converted weights on disk, the cache and feature
extraction (store). The ``convert``/``features`` command line is cifar_flax/pretrained.py."""
