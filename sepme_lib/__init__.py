"""sepme_lib: Separable Multi-Concept Erasure (SepME) and its relatives, for the sepme-course notebooks.

The public API (stable; used by the notebooks, the README, the benchmarks and the command line)::

    import sepme_lib as sm
    model = sm.load_model("tiny")                      # or an SD 1.x / SDXL hub id or local folder
    judge = sm.load_classifier(model=model)
    deltas = sm.erase(model, ["striped", "dotted"], method="sepme", mode="separate")
    with sm.applied(model, deltas, scales=[1, 0]):     # theta + 1 * dTheta_striped
        images = sm.generate(model, ["a red star in striped style"], seeds=[0])
    sm.leakage(model, deltas[0], [""] + deltas[1].info["prompts"])   # ~1e-6: dotted's keys/values untouched
    sm.acc_table(model, judge, ["striped", "dotted"], n=8, deltas=deltas)
    deltas[0].save_lora("out/striped")                 # a diffusers LoRA folder (+ model card); Delta.from_lora

Modules, in one-way layers (each imports only modules above it in this list; ``tests/test_layers.py`` checks it):
``config`` | ``world``, ``paper``, ``report``, ``plots``, ``picture``, ``perceptual``, ``checkpoint``, ``storage`` |
``families`` (what differs per model family) | ``model`` | ``loading`` | ``concepts``, ``deltas``, ``card`` |
``classifier``, ``gcirs``, ``lora`` | ``nullspace``, ``adapters`` | ``attacks`` | ``sepme`` | ``closed_form``,
``finetune``, ``speed`` | ``methods`` | ``evaluate``, ``separability`` | ``widgets``, ``exercise_kit``, ``robustness`` |
``exercises_beyond`` | ``exercises`` | ``train_tiny``, ``train_classifier`` | ``random_sd`` | ``gpupath`` | ``t4`` |
``bench``, ``course``, ``scaleout`` | ``cli`` (``python -m sepme_lib``, the ``sepme`` command). The design document is ``docs/DESIGN.md``.
"""
from .classifier import load_classifier
from .concepts import Concept, concept_set, make_concepts
from .config import VERSION as __version__
from .config import SepmeError, get_device
from .deltas import Delta, applied, combine
from .evaluate import acc_table, generate
from .lora import LoraExport  # attaches Delta.to_lora / save_lora / from_lora
from .loading import load_model
from .methods import METHODS, erase
from .nullspace import leakage, null_space

__all__ = ["load_model", "load_classifier", "erase", "METHODS", "Delta", "combine", "applied", "leakage",
           "null_space", "generate", "acc_table", "LoraExport", "Concept", "make_concepts", "concept_set",
           "get_device", "SepmeError", "__version__"]
