"""Distillation methods: logit-based (KD, GKD) and the feature-based methods of the source papers."""
