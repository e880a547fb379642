"""The SepME paper's own numbers on Stable Diffusion 1.4 (ACC only), to show beside ours in notebook 07.

Transcribed from Tables 1, 2 and 4 of Zhao et al. (2024), *Separable Multi-Concept Erasure from Diffusion Models*. The paper's
artists map onto the world's styles in the order they are erased: Van Gogh -> striped (concept 1),
Cezanne -> checkered (concept 2), Picasso -> dotted (concept 3).
"""
from __future__ import annotations

ANALOGUE = {"VG": "striped", "CE": "checkered", "PC": "dotted"}

# Table 1: single-concept erasure, ACC of each evaluated artist (rows: erased artist), and ||dTheta||_p
TABLE1 = {
    "FMN10": {"VG": dict(VG=0.544, PC=1.0, CE=1.0), "PC": dict(VG=1.0, PC=1.0, CE=1.0), "CE": dict(VG=0.952, PC=1.0, CE=1.0)},
    "ESD": {"VG": dict(VG=0.320, PC=1.0, CE=1.0), "PC": dict(VG=0.908, PC=0.400, CE=1.0), "CE": dict(VG=0.908, PC=1.0, CE=0.428)},
    "AbConcept": {"VG": dict(VG=0.0, PC=0.9, CE=0.82), "PC": dict(VG=0.684, PC=0.0, CE=0.752), "CE": dict(VG=0.728, PC=0.852, CE=0.036)},
    "G-CiRs": {"VG": dict(VG=0.228, PC=1.0, CE=1.0), "PC": dict(VG=0.908, PC=0.052, CE=1.0), "CE": dict(VG=0.908, PC=1.0, CE=0.0)},
}
TABLE1_L1 = {"FMN10": 44.97, "ESD": 125.4, "AbConcept": 153.9, "G-CiRs": 38.87}  # mean over VG/PC/CE rows

# Table 2: VG+PC+CE erased together
TABLE2 = {
    "FMN20": dict(VG=0.544, PC=0.952, CE=0.180, Others=0.955, l1=92.58),
    "FMN50": dict(VG=0.136, PC=0.0, CE=0.0, Others=0.693, l1=243.5),
    "ESD": dict(VG=0.364, PC=0.252, CE=0.356, Others=0.897, l1=128.4),
    "AbConcept": dict(VG=0.092, PC=0.132, CE=0.500, Others=0.977, l1=153.8),
    "G-CiRs": dict(VG=0.224, PC=0.0, CE=0.0, Others=0.958, l1=58.22),
}

# Table 4: combinations of increments (columns: which of dTheta_1 (VG), dTheta_2 (CE), dTheta_3 (PC) are added)
TABLE4_SUBSETS = [["VG"], ["CE"], ["PC"], ["VG", "CE"], ["VG", "PC"], ["CE", "PC"], ["VG", "CE", "PC"]]
TABLE4 = {
    "SepME1": dict(VG=[0.356, 1.0, 0.908, 0.308, 0.308, 0.956, 0.308], CE=[1.0, 0.320, 1.0, 0.320, 1.0, 0.288, 0.320],
                   PC=[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    "SepME2": dict(VG=[0.228, 0.956, 0.956, 0.228, 0.228, 0.956, 0.228], CE=[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.052],
                   PC=[0.964, 1.0, 0.288, 0.964, 0.108, 0.288, 0.108]),
    "AbConcept": dict(VG=[0.0, 0.728, 0.684, 0.0, 0.0, 0.636, 0.0], CE=[0.820, 0.036, 0.752, 0.288, 0.680, 0.252, 0.144],
                      PC=[0.900, 0.852, 0.0, 0.600, 0.152, 0.200, 0.052]),
    "G-CiRs": dict(VG=[0.228, 0.908, 0.908, 0.184, 0.092, 0.544, 0.184], CE=[1.0, 0.0, 1.0, 0.108, 0.716, 0.216, 0.036],
                   PC=[1.0, 1.0, 0.052, 1.0, 0.452, 0.200, 0.200]),
}


def table4_rows(method: str) -> list[dict]:
    """Table 4 for one method as rows ``{"erased": "VG+CE", "VG": acc, "CE": acc, "PC": acc}``."""
    t = TABLE4[method]
    return [dict(erased="+".join(s), **{a: t[a][k] for a in ("VG", "CE", "PC")}) for k, s in enumerate(TABLE4_SUBSETS)]


def restoration_drift(method: str) -> float:
    """Largest |ACC - 1| of an artist whose increment is left out of a combination (original ACC is 1)."""
    t = TABLE4[method]
    return max(abs(t[a][k] - 1.0) for k, s in enumerate(TABLE4_SUBSETS) for a in ("VG", "CE", "PC") if a not in s)
