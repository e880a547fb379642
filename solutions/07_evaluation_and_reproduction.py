# Solutions of notebook 07's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 07.1
# Exercise 07.1: the three numbers that summarise a combination table (erased, kept, restored).
def summary(rows, original, delta_names):
    erased, ratios, drift = [], [], []
    for row in rows:
        for c, a in row["acc"].items():
            if c in row["subset"]:
                erased.append(a)
            else:
                ratios.append(a / original[c])
                if c in delta_names:
                    drift.append(abs(a - original[c]))
    return dict(erased_acc_max=max(erased), others_ratio_min=min(ratios), restoration_drift_max=max(drift))


# %% Wrong 07.1 (the kept classes' ACC is not divided by their original ACC)
def summary(rows, original, delta_names):
    erased, ratios, drift = [], [], []
    for row in rows:
        for c, a in row["acc"].items():
            if c in row["subset"]:
                erased.append(a)
            else:
                ratios.append(a)
                if c in delta_names:
                    drift.append(abs(a - original[c]))
    return dict(erased_acc_max=max(erased), others_ratio_min=min(ratios), restoration_drift_max=max(drift))


# %% Exercise 07.2
# Exercise 07.2: ||dTheta||_p = (1/M) sum_l ||dW_l||_1 of theta + sum_i dTheta_i (M: the tensors edited).
def l1_p(increments):
    total = {}
    for tensors in increments:
        for name, dW in tensors.items():
            total[name] = total[name] + dW if name in total else dW
    return float(sum(dW.abs().sum() for dW in total.values()) / len(total))


# %% Wrong 07.2 (the increments' norms added up instead of the norm of their sum)
def l1_p(increments):
    return float(sum(sum(dW.abs().sum() for dW in t.values()) / len(t) for t in increments))


# %% Exercise 07.3
# Exercise 07.3: 1 - SSIM (7x7 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, valid positions only).
import torch
import torch.nn.functional as F
from sepme_lib import perceptual


def one_minus_ssim(a, b):
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = perceptual.gaussian_window(7, 1.5).double().expand(c, 1, 7, 7)

    def blur(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float((1 - s.mean(dim=(1, 2, 3))).mean())


# %% Wrong 07.3 (zero padding keeps every position, so the border windows see black pixels)
import torch
import torch.nn.functional as F
from sepme_lib import perceptual


def one_minus_ssim(a, b):
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = perceptual.gaussian_window(7, 1.5).double().expand(c, 1, 7, 7)

    def blur(x):
        return F.conv2d(x, w, groups=c, padding=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float((1 - s.mean(dim=(1, 2, 3))).mean())
