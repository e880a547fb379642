# Solutions of notebook 05's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 05.1
# Exercise 05.1: the share of images judged as each style the judge knows (0 for the styles no image got).
def style_shares(judge, images):
    styles = judge.predict(images)["style"]
    return {label: styles.count(label) / len(styles) for label in judge.heads_labels["style"]}


# %% Wrong 05.1 (only the styles that occur: the anchor and the others with no image are missing)
def style_shares(judge, images):
    styles = judge.predict(images)["style"]
    return {label: styles.count(label) / len(styles) for label in set(styles)}


# %% Exercise 05.2
# Exercise 05.2: ACC of `concept` under theta + s * dTheta_concept (every other increment off), one value per s.
import sepme_lib as sm


def acc_vs_strength(model, judge, deltas, concept, strengths, n, steps):
    names = [d.name for d in deltas]
    out = []
    for s in strengths:
        scales = [s if name == concept else 0.0 for name in names]
        out.append(sm.acc_table(model, judge, [concept], n, deltas=deltas, scales=scales, steps=steps)[concept])
    return out


# %% Wrong 05.2 (always scales the first increment, as the notebook's sweep does for concept 1)
import sepme_lib as sm


def acc_vs_strength(model, judge, deltas, concept, strengths, n, steps):
    out = []
    for s in strengths:
        scales = [s] + [0.0] * (len(deltas) - 1)
        out.append(sm.acc_table(model, judge, [concept], n, deltas=deltas, scales=scales, steps=steps)[concept])
    return out


# %% Exercise 05.3
# Exercise 05.3: the smallest strength at which the measured ACC curve reaches `threshold` (linear interpolation
# between the two measurements around the first crossing; the first strength if it starts there; None if never).
def smallest_erasing_strength(strengths, accs, threshold=0.1):
    if accs[0] <= threshold:
        return strengths[0]
    for (s0, a0), (s1, a1) in zip(zip(strengths, accs), zip(strengths[1:], accs[1:])):
        if a1 <= threshold:
            return s0 + (a0 - threshold) / (a0 - a1) * (s1 - s0)
    return None


# %% Wrong 05.3 (the first measured strength at or below the threshold: no interpolation)
def smallest_erasing_strength(strengths, accs, threshold=0.1):
    for s, a in zip(strengths, accs):
        if a <= threshold:
            return s
    return None
