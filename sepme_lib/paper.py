"""The SepME paper's own numbers on Stable Diffusion 1.4 (ACC, and ``||dTheta||_p`` where given), to show beside ours
in notebook 07.

Transcribed from Tables 1-6 of Zhao et al. (2024), *Separable Multi-Concept Erasure from Diffusion Models* (LPIPS left
out: the course reports 1-SSIM unless LPIPS's weights are on disk). The paper's artists map onto the world's styles in
the order they are erased: Van Gogh -> striped (concept 1), Cezanne -> checkered (concept 2), Picasso -> dotted
(concept 3). "Others" is the mean ACC of the paper's remaining classes (blank and six more artists).
"""
from __future__ import annotations

ANALOGUE = {"VG": "striped", "CE": "checkered", "PC": "dotted"}

# Table 1: single-concept erasure, ACC of each evaluated artist (rows: erased artist), and ||dTheta||_p
TABLE1 = {
    "FMN10": {"VG": dict(VG=0.544, PC=1.0, CE=1.0), "PC": dict(VG=1.0, PC=1.0, CE=1.0), "CE": dict(VG=0.952, PC=1.0, CE=1.0)},
    "ESD": {"VG": dict(VG=0.320, PC=1.0, CE=1.0), "PC": dict(VG=0.908, PC=0.400, CE=1.0), "CE": dict(VG=0.908, PC=1.0, CE=0.428)},
    "AbConcept": {"VG": dict(VG=0.0, PC=0.9, CE=0.82), "PC": dict(VG=0.684, PC=0.0, CE=0.752), "CE": dict(VG=0.728, PC=0.852, CE=0.036)},
    "G-CiRs": {"VG": dict(VG=0.228, PC=1.0, CE=1.0), "PC": dict(VG=0.908, PC=0.052, CE=1.0), "CE": dict(VG=0.908, PC=1.0, CE=0.0)},
    "FMN20": {"VG": dict(VG=0.500, PC=1.0, CE=0.964), "PC": dict(VG=0.952, PC=0.952, CE=1.0),
              "CE": dict(VG=0.772, PC=1.0, CE=0.820)},
}
TABLE1_L1 = {"FMN10": 44.97, "ESD": 125.4, "AbConcept": 153.9, "G-CiRs": 38.87, "FMN20": 90.67}  # mean over VG/PC/CE
TABLE1_L1_ROWS = {"FMN10": dict(VG=44.18, PC=45.41, CE=45.31), "FMN20": dict(VG=86.05, PC=93.63, CE=92.32),
                  "ESD": dict(VG=120.8, PC=126.9, CE=128.5), "AbConcept": dict(VG=158.3, PC=146.5, CE=156.9),
                  "G-CiRs": dict(VG=43.17, PC=36.90, CE=36.55)}

# Table 2: VG+PC+CE erased together
TABLE2 = {
    "FMN20": dict(VG=0.544, PC=0.952, CE=0.180, Others=0.955, l1=92.58),
    "FMN30": dict(VG=0.500, PC=0.552, CE=0.0, Others=0.878, l1=150.3),
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

# Table 3: dTheta_1..3 trained *simultaneously* (SepME's joint mode); AbConcept and G-CiRs re-finetuned for each
# combination (columns in TABLE4_SUBSETS order)
TABLE3 = {
    "SepME": dict(VG=[0.320, 0.956, 0.956, 0.364, 0.272, 0.956, 0.364], CE=[1.0, 0.180, 1.0, 0.180, 1.0, 0.180, 0.180],
                  PC=[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    "AbConcept": dict(VG=[0.0, 0.728, 0.684, 0.136, 0.044, 0.728, 0.0], CE=[0.820, 0.036, 0.752, 0.572, 0.820, 0.252, 0.464],
                      PC=[0.900, 0.852, 0.0, 0.952, 0.352, 0.728, 0.152]),
    "G-CiRs": dict(VG=[0.228, 0.908, 0.908, 0.184, 0.184, 0.700, 0.224], CE=[1.0, 0.0, 1.0, 0.108, 0.780, 0.036, 0.0],
                   PC=[1.0, 1.0, 0.052, 1.0, 0.152, 0.0, 0.0]),
}

# Table 5 (appendix): Table 4 with the "Others" row, and AbConcept / G-CiRs on to_k/to_v only ("-kv")
TABLE5 = {
    "SepME1": dict(TABLE4["SepME1"], Others=[0.957, 0.891, 0.955, 0.855, 0.957, 0.845, 0.803]),
    "SepME2": dict(TABLE4["SepME2"], Others=[0.994, 0.925, 0.986, 0.946, 0.970, 0.924, 0.916]),
    "AbConcept": dict(TABLE4["AbConcept"], Others=[0.952, 0.923, 0.971, 0.861, 0.891, 0.903, 0.783]),
    "AbConcept-kv": dict(VG=[0.592, 0.820, 0.728, 0.320, 0.184, 0.272, 0.184],
                         CE=[1.0, 0.200, 0.800, 0.252, 0.600, 0.052, 0.0], PC=[1.0, 0.964, 0.216, 0.856, 0.320, 0.072, 0.144],
                         Others=[0.973, 0.917, 0.952, 0.889, 0.937, 0.860, 0.805]),
    "G-CiRs": dict(TABLE4["G-CiRs"], Others=[0.994, 0.912, 0.950, 0.940, 0.969, 0.890, 0.843]),
    "G-CiRs-kv": dict(VG=[0.344, 0.908, 0.820, 0.228, 0.228, 0.320, 0.136], CE=[0.892, 0.356, 0.752, 0.152, 0.900, 0.152, 0.152],
                      PC=[1.0, 1.0, 0.148, 0.832, 0.252, 0.144, 0.072], Others=[0.944, 0.908, 0.920, 0.873, 0.938, 0.848, 0.791]),
}

# Table 6 (appendix): G-CiRs erasing one artist at several stop thresholds tau (Eq. 4)
TABLE6 = {
    "VG": [dict(tau=1e-3, VG=0.684, PC=1.0, CE=1.0, Others=1.0, l1=24.28),
           dict(tau=5e-4, VG=0.592, PC=1.0, CE=1.0, Others=1.0, l1=27.43),
           dict(tau=0.0, VG=0.456, PC=1.0, CE=1.0, Others=1.0, l1=36.24),
           dict(tau=-5e-4, VG=0.228, PC=1.0, CE=1.0, Others=0.992, l1=43.17),
           dict(tau=-1e-3, VG=0.092, PC=1.0, CE=0.892, Others=0.976, l1=51.63)],
    "PC": [dict(tau=5e-4, VG=0.956, PC=1.0, CE=1.0, Others=1.0, l1=1.522),
           dict(tau=5e-5, VG=0.924, PC=0.084, CE=1.0, Others=0.976, l1=27.58),
           dict(tau=0.0, VG=0.908, PC=0.052, CE=1.0, Others=0.952, l1=36.90),
           dict(tau=-5e-4, VG=0.044, PC=0.0, CE=0.0, Others=0.812, l1=65.03),
           dict(tau=-1e-3, VG=0.0, PC=0.0, CE=0.036, Others=0.696, l1=67.89)],
    "CE": [dict(tau=1e-4, VG=0.772, PC=1.0, CE=0.276, Others=0.976, l1=23.51),
           dict(tau=5e-5, VG=0.772, PC=1.0, CE=0.072, Others=0.960, l1=30.67),
           dict(tau=0.0, VG=0.908, PC=1.0, CE=0.0, Others=0.912, l1=36.55),
           dict(tau=-5e-5, VG=0.636, PC=0.852, CE=0.0, Others=0.904, l1=41.20),
           dict(tau=-1e-4, VG=0.272, PC=0.852, CE=0.0, Others=0.832, l1=45.75)],
}


def combination_tab(method: str, table: int = 4) -> dict:
    """One method of Table 3, 4 or 5 as ``{"original": {artist: 1.0}, "rows": [{"subset": [...], "acc": {...}}]}``,
    the shape of ``evaluate.combination_table``, so ``report.combination_markdown(tab, names=["VG", "CE", "PC"])``
    lays it out like ours (notebook 07). Table 5 adds the "Others" row."""
    tables = {3: TABLE3, 4: TABLE4, 5: TABLE5}
    if table not in tables or method not in tables[table]:
        raise ValueError(f"no method {method!r} in Table {table}; Tables 3, 4, 5 have "
                         f"{ {k: list(v) for k, v in tables.items()} }")
    t = tables[table][method]
    rows = [dict(subset=list(sub), acc={a: t[a][k] for a in t}) for k, sub in enumerate(TABLE4_SUBSETS)]
    return dict(original={a: 1.0 for a in t}, rows=rows)


def table1_results(method: str) -> dict:
    """Table 1 for one method as ``{erased: {artist: ACC}}`` (``report.erasure_markdown``'s input)."""
    return {a: dict(TABLE1[method][a]) for a in ("VG", "PC", "CE")}


def table4_rows(method: str) -> list[dict]:
    """Table 4 for one method as rows ``{"erased": "VG+CE", "VG": acc, "CE": acc, "PC": acc}``."""
    t = TABLE4[method]
    return [dict(erased="+".join(s), **{a: t[a][k] for a in ("VG", "CE", "PC")}) for k, s in enumerate(TABLE4_SUBSETS)]


def restoration_drift(method: str) -> float:
    """Largest |ACC - 1| of an artist whose increment is left out of a combination (original ACC is 1)."""
    t = TABLE4[method]
    return max(abs(t[a][k] - 1.0) for k, s in enumerate(TABLE4_SUBSETS) for a in ("VG", "CE", "PC") if a not in s)
