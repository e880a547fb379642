# Solutions of notebook 02's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 02.1
# Exercise 02.1: Eq. (2), L_cor = mean(r_theta(c) * r_{theta+dtheta}(c)), with no gradient into the frozen r.
def correlation_loss(r, r_new):
    return (r.detach() * r_new).mean()


# %% Wrong 02.1 (the frozen representation is not detached)
def correlation_loss(r, r_new):
    return (r * r_new).mean()


# %% Exercise 02.2
# Exercise 02.2: Eq. (3) as the library computes it: eta_i = ||r_1 * r'_1|| / ||r_i * r'_i||.
def eta_weights(rs, r_news):
    norms = [float((r * rn).norm()) for r, rn in zip(rs, r_news)]
    return [norms[0] / n for n in norms]


# %% Wrong 02.2 (the ratio turned upside down)
def eta_weights(rs, r_news):
    norms = [float((r * rn).norm()) for r, rn in zip(rs, r_news)]
    return [n / norms[0] for n in norms]


# %% Exercise 02.3
# Exercise 02.3: Eq. (4): L_mom starts at the first loss; stop (1-based step returned) when L_mom < tau at a 0-based
# step index i > warmup; None if it never stops.
def stop_step(losses, alpha, tau, warmup):
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
