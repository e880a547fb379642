# Solutions of notebook 02's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 02.1
# Exercise 02.1: Eq. (2), the correlation loss L_cor
def correlation_loss(r, r_new):
    """L_cor of Eq. (2): r = r_theta(c) from the frozen model (no gradient), r_new = r_{theta+dtheta}(c)."""
    return (r.detach() * r_new).mean()


# %% Wrong 02.1 (the frozen representation is not detached)
def correlation_loss(r, r_new):
    return (r * r_new).mean()


# %% Exercise 02.2
# Exercise 02.2: Eq. (3), the balancing weights eta_i
def eta_weights(rs, r_news):
    """[eta_1, ..., eta_N] for concepts with representations rs[i] (frozen) and r_news[i] (edited); eta_1 = 1."""
    norms = [float((r.detach() * rn.detach()).norm()) for r, rn in zip(rs, r_news)]
    return [norms[0] / n for n in norms]


# %% Wrong 02.2 (the ratio turned upside down)
def eta_weights(rs, r_news):
    norms = [float((r * rn).norm()) for r, rn in zip(rs, r_news)]
    return [n / norms[0] for n in norms]


# %% Exercise 02.3
# Exercise 02.3: Eq. (4), the step at which momentum early stopping fires
def stop_step(losses, alpha, tau, warmup):
    """The 1-based step at which L_mom < tau stops the run (0-based index > warmup), or None if it never does."""
    mom = None
    for i, loss in enumerate(losses):
        mom = loss if mom is None else alpha * mom + (1 - alpha) * loss
        if i > warmup and mom < tau:
            return i + 1
    return None


# %% Wrong 02.3 (momentum started at 0 instead of the first loss)
def stop_step(losses, alpha, tau, warmup):
    mom = 0.0
    for i, loss in enumerate(losses):
        mom = alpha * mom + (1 - alpha) * loss
        if i > warmup and mom < tau:
            return i + 1
    return None
