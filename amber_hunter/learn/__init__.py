"""Learning from labelled data: datasets and labels, the embedding cache, evaluation protocols,
training workflows, and the labelled-data download.

Uses ``model`` for segment → embed → classify; never imports ``run``.
"""
