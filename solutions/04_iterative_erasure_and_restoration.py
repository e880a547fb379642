# Solutions of notebook 04's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 04.1
# Exercise 04.1: the prompts of A_t in SepME_2 (1-based stage t >= 2): c_0 and every prompt of concepts 1..t-1.
def stage_prompts(concepts, t):
    return [""] + [p for c in concepts[:t - 1] for p in c.prompts]


# %% Wrong 04.1 (the stage's own concept protected too: then it could not be erased)
def stage_prompts(concepts, t):
    return [""] + [p for c in concepts[:t] for p in c.prompts]


# %% Exercise 04.2
# Exercise 04.2: theta + sum_i s_i dTheta_i on every matrix some increment edits.
def combined_weights(model, deltas, scales):
    params = dict(model.unet.named_parameters())
    out = {}
    for d, s in zip(deltas, scales):
        for k, v in d.tensors.items():
            out[k] = out.get(k, params[k].detach().float()) + s * v.float()
    return out


# %% Wrong 04.2 (the scales are ignored: every increment added once)
def combined_weights(model, deltas, scales):
    params = dict(model.unet.named_parameters())
    out = {}
    for d in deltas:
        for k, v in d.tensors.items():
            out[k] = out.get(k, params[k].detach().float()) + v.float()
    return out


# %% Exercise 04.3
# Exercise 04.3: SepME_2's stage t (1-based, t >= 2) as a projection: any increment {name: dW} (d_out x d_in) made
# to leave c_0 and concepts 1..t-1 unchanged, dW -> dW S_t S_t^T with S_t an orthonormal basis of null(A_t) (Eq. 8-9).
from sepme_lib import nullspace


def project_to_stage(model, concepts, t, tensors):
    prompts = [""] + [p for c in concepts[:t - 1] for p in c.prompts]
    S = nullspace.null_space(nullspace.stack_rows(model, prompts)).basis.float()
    P = S @ S.T
    return {k: v.float() @ P for k, v in tensors.items()}


# %% Wrong 04.3 (A_t also stacks concept t's own prompts, as SepME_1 would for another concept)
from sepme_lib import nullspace


def project_to_stage(model, concepts, t, tensors):
    prompts = [""] + [p for c in concepts[:t] for p in c.prompts]
    S = nullspace.null_space(nullspace.stack_rows(model, prompts)).basis.float()
    P = S @ S.T
    return {k: v.float() @ P for k, v in tensors.items()}
