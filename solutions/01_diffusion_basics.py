# Solutions of notebook 01's exercises (kept apart from the notebook; tests/test_exercises.py runs each block in
# place of the notebook's stub cell, then the notebook's check cell). A "Wrong" block is a plausible mistake that the
# check must catch.

# %% Exercise 01.1
# Exercise 01.1: the forward process x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for a batch of timesteps t.
def forward_noise(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# %% Wrong 01.1 (abar used without its square roots)
def forward_noise(x0, noise, t, alphas_cumprod):
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return a * x0 + (1 - a) * noise


# %% Exercise 01.2
# Exercise 01.2: one deterministic DDIM step (eta = 0) from x_t to x_t' given the predicted noise eps.
def ddim_step(x_t, eps, t, t_prev, alphas_cumprod):
    a, a_prev = alphas_cumprod[t].cpu(), alphas_cumprod[t_prev].cpu()
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps


# %% Wrong 01.2 (the noise direction scaled with abar_t instead of abar_t')
def ddim_step(x_t, eps, t, t_prev, alphas_cumprod):
    a, a_prev = alphas_cumprod[t].cpu(), alphas_cumprod[t_prev].cpu()
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0_hat + (1 - a).sqrt() * eps


# %% Exercise 01.3
# Exercise 01.3: the keys K = c W_k^T (L, d_out) of one attn2 layer for one prompt.
def keys(model, layer_name, prompt):
    c = model.embed_context([prompt])[0]
    W_k = model.cross_attention_layers()[layer_name].to_k.weight
    return c @ W_k.T


# %% Wrong 01.3 (the value projection instead of the key projection)
def keys(model, layer_name, prompt):
    c = model.embed_context([prompt])[0]
    W_v = model.cross_attention_layers()[layer_name].to_v.weight
    return c @ W_v.T
