# Solutions of notebook 00's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 00.1
# Exercise 00.1: per head, the share of images whose judged label is the one their prompt asked for.
def head_accuracy(pred, targets):
    heads = [h for h in pred if h in targets[0]]
    return {h: sum(p == t[h] for p, t in zip(pred[h], targets)) / len(targets) for h in heads}


# %% Wrong 00.1 (every head compared with the first image's target instead of each image's own)
def head_accuracy(pred, targets):
    heads = [h for h in pred if h in targets[0]]
    return {h: sum(p == targets[0][h] for p in pred[h]) / len(targets) for h in heads}


# %% Exercise 00.2
# Exercise 00.2: a caption in the world's grammar: "a [colour] <shape|object>[ in <style> style]".
def caption(shape, style, colour):
    words = ([colour] if colour else []) + [shape or "object"]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if style and style != "blank":
        text += f" in {style} style"
    return text


# %% Wrong 00.2 (the blank style written out as a style phrase)
def caption(shape, style, colour):
    words = ([colour] if colour else []) + [shape or "object"]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if style:
        text += f" in {style} style"
    return text


# %% Exercise 00.3
# Exercise 00.3: {target style: {judged style: count}}; every style of the judge in each row, zeros included.
def style_confusion(judge, images, targets):
    judged = judge.predict(images)["style"]
    return {t: {s: sum(1 for x, j in zip(targets, judged) if x == t and j == s) for s in judge.heads_labels["style"]}
            for t in dict.fromkeys(targets)}


# %% Wrong 00.3 (rows and columns swapped: rows keyed by what the judge reads)
def style_confusion(judge, images, targets):
    judged = judge.predict(images)["style"]
    return {t: {s: sum(1 for x, j in zip(targets, judged) if j == t and x == s) for s in judge.heads_labels["style"]}
            for t in dict.fromkeys(targets)}
