"""One scene through the model: segment (SLIC) → embed → classify (model bundles) → detect.

Imports ``geo`` and the base modules only. TensorFlow is imported lazily, inside ``embed``, when a
CNN embedder is built.
"""
