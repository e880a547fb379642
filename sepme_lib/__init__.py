"""sepme_lib: Separable Multi-Concept Erasure (SepME) and its relatives, for the sepme-course notebooks.

Layers (each imports only those before it): ``config``, ``world``, ``model``, ``classifier`` ->
``core``, ``deltas`` -> ``sepme``, ``relatives`` -> ``evaluate``, ``perceptual``, ``widgets``, ``bench``.
"""
__version__ = "0.1.0"
