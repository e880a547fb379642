"""The course's exercises: the checks behind every ``## Exercises`` section of the notebooks.

Each exercise has an id ``"NN.k"`` (notebook NN, exercise k). In the notebook, the learner writes a function in a
stub cell that starts with ``# Exercise NN.k``; the stub's body raises ``NotImplementedError`` until it is written.
The next cell calls ``exercises.check("NN.k", the_function)``, which

* prints ``not done yet`` and returns ``False`` while the stub still raises ``NotImplementedError`` (the committed
  notebooks store this: the learner writes the code);
* runs the exercise's check and prints ``correct`` (returns ``True``), or raises :class:`ExerciseFailed` with a
  hint that says *what* is wrong (a shape, a sign, a property, a mismatch and its size), never the expected value.

A check never recomputes the expected value with the formula it tests: it compares with the library's own code
(written and tested separately, often against the authors' code), with properties the answer must have (shapes,
limits, invariances), or with behaviour of the model. The solutions live apart from the notebooks, in
``solutions/NN_*.py`` (one ``# %% Exercise NN.k`` block per exercise, plus a ``# %% Wrong NN.k`` block with a
plausible mistake); ``tests/test_exercises.py`` runs every exercise with its solution put in (it must pass) and with
the wrong one (it must fail), so ``make test`` catches a wrong solution and a check that cannot fail.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import closed_form as _closed_form  # 06
from . import deltas as _deltas  # 07
from . import evaluate as _evaluate
from . import exercises_beyond  # noqa: F401 - registers the checks of notebooks 08-09
from . import finetune as _finetune
from . import gcirs, nullspace, sepme
from . import methods as _methods
from . import paper as _paper
from . import perceptual as _perceptual
from . import world as _world
from .classifier import accuracy
from .concepts import as_concepts
from .deltas import edited_weights
from .evaluate import acc_table, eval_prompts, generate
from .exercise_kit import (  # noqa: F401
    _CACHE,
    CHECKS,
    RESULTS,
    ExerciseFailed,
    _judge,
    _model,
    _rand,
    check,
    exercise,
    expect,
    expect_close,
    ids,
    notebook_exercises,
    solution_blocks,
)


# ------------------------------------------------------------------------------------------ notebook 00
@exercise("00.1", "ACC on every head from the judge's predictions")
def _check_00_1(head_accuracy):
    model, judge, cs = _model(), _judge(), _evaluate.concept_set(_model())
    for name, ds in (("striped", sepme.bundled_deltas(model, ("striped",))), ("dotted", None)):
        imgs = _evaluate.generate(model, cs.eval_prompts(name, 6), range(6), deltas=ds, steps=8)
        got = head_accuracy(judge.predict(imgs), cs.eval_targets(name, 6))
        ref = _evaluate.acc_heads(model, judge, [name], 6, deltas=ds, steps=8)[name]
        expect(isinstance(got, dict) and set(got) == {"style", "shape", "colour"},
               "expected a dict {head: share of images read as their target} with the heads the targets name")
        for h, v in got.items():
            expect_close(v, ref[h], f"the {h} accuracy of {name!r}{' erased' if ds else ''}", atol=1e-9)


@exercise("00.2", "a caption in the world's grammar")
def _check_00_2(caption):
    for spec in (("circle", "striped", "red"), ("star", "blank", "blue"), ("triangle", "outline", None),
                 (None, "dotted", "purple"), ("square", None, None), (None, None, None)):
        got = caption(*spec)
        expect(got == _world.caption(*spec), f"caption{spec} gives {got!r}: check the article, the noun without a "
                                             "shape, and what the blank style (or none) writes")
    model, judge = _model(), _judge()
    pred = judge.predict(_evaluate.generate(model, [caption("star", "checkered", "green")] * 4, range(4), steps=20))
    ok = sum(p == ("checkered", "star", "green") for p in zip(pred["style"], pred["shape"], pred["colour"]))
    return f"The judge reads style, shape and colour right on {ok} of 4 images of {caption('star', 'checkered', 'green')!r}."


@exercise("00.3", "where the judge puts each style: a confusion table")
def _check_00_3(style_confusion):
    model, judge = _model(), _judge()
    targets = ["striped"] * 3 + ["dotted"] * 2 + ["blank"]
    imgs = _evaluate.generate(model, ["a red circle in striped style"] * 3 + ["a blue star in dotted style"] * 2
                              + ["a green square"], range(6), deltas=sepme.bundled_deltas(model, ("striped",)), steps=8)
    got, styles = style_confusion(judge, imgs, targets), judge.heads_labels["style"]
    expect(isinstance(got, dict) and set(got) == set(targets), "expected one row per target style that occurs")
    for t, row in got.items():
        expect(isinstance(row, dict) and set(row) == set(styles), f"row {t!r}: one count per style the judge knows")
        sub = imgs[[k for k, x in enumerate(targets) if x == t]]
        expect(all(row[s] == round(_evaluate.accuracy(judge, sub, "style", s) * len(sub)) for s in styles),
               f"row {t!r}: the counts are wrong (rows are the targets, columns what the judge reads)")


# ------------------------------------------------------------------------------------------ notebook 01
@exercise("01.1", "the forward process q(x_t | x_0)")
def _check_01_1(forward_noise):
    model = _model()
    x0, noise, t = _rand(5, *model.latent_shape, seed=1), _rand(5, *model.latent_shape, seed=2), torch.tensor(
        [0, 10, 300, 700, 999])
    expect_close(forward_noise(x0, noise, t, model.alphas_cumprod), model.scheduler.add_noise(x0, noise, t),
                 "x_t at t = 0, 10, 300, 700, 999 (against the scheduler's add_noise)", rtol=1e-4, atol=1e-6)


@exercise("01.2", "one DDIM step (eta = 0)")
def _check_01_2(ddim_step):
    model = _model()
    sched = type(model.scheduler).from_config(model.scheduler.config, prediction_type="epsilon", clip_sample=False)
    sched.set_timesteps(20)
    x, eps = _rand(2, *model.latent_shape, seed=3), _rand(2, *model.latent_shape, seed=4)
    for t in (int(sched.timesteps[2]), int(sched.timesteps[10]), int(sched.timesteps[-2])):
        t_prev = t - model.num_train_timesteps // 20
        expect_close(ddim_step(x, eps, t, t_prev, model.alphas_cumprod), sched.step(eps, t, x, eta=0.0).prev_sample,
                     f"x_t' from t = {t} to t' = {t_prev} (against diffusers' DDIMScheduler.step)", rtol=1e-3, atol=1e-5)


@exercise("01.3", "the keys K = c W_k^T of a cross-attention layer")
def _check_01_3(keys):
    model, seen, prompt = _model(), {}, "a green star in dotted style"
    for name, m in list(model.cross_attention_layers().items())[::5]:
        hook = m.to_k.register_forward_hook(lambda mod, inp, out: seen.__setitem__("K", out.detach()[0]))
        try:
            with torch.no_grad():
                model.eps(_rand(1, *model.latent_shape), torch.tensor([500]), model.embed([prompt]))
        finally:
            hook.remove()
        expect_close(keys(model, name, prompt), seen["K"], f"the keys of {name} (against a hook on its to_k)")


# ------------------------------------------------------------------------------------------ notebook 02
@exercise("02.1", "Eq. (2), the correlation loss")
def _check_02_1(correlation_loss):
    for seed, shape in ((0, (4, 4, 8, 8)), (1, (2, 3, 16, 16))):
        r, r_new = _rand(*shape, seed=seed), _rand(*shape, seed=seed + 10)
        expect_close(correlation_loss(r, r_new), float(gcirs.correlation_loss(r, r_new)),
                     f"L_cor on a random batch of shape {shape}")
    r = _rand(4, 4, 8, 8, seed=3)
    expect(float(correlation_loss(r, r)) > 0, "L_cor of a representation with itself must be positive")
    expect(float(correlation_loss(r, -r)) < 0, "L_cor of a representation with its negative must be negative")
    r_new = _rand(4, 4, 8, 8, seed=4, dtype=torch.float32).requires_grad_(True)
    correlation_loss(r.requires_grad_(True), r_new).backward()
    expect(r.grad is None or float(r.grad.abs().max()) == 0,
           "no gradient may flow into r_theta(c): it comes from the frozen model (detach it)")
    expect(r_new.grad is not None, "the gradient must reach r_{theta+dtheta}(c)")


@exercise("02.2", "Eq. (3), the balancing weights eta_i")
def _check_02_2(eta_weights):
    rs = [_rand(2, 4, 8, 8, seed=s) for s in range(3)]
    rns = [((1 + k) * _rand(2, 4, 8, 8, seed=10 + s)).requires_grad_(True) for k, s in enumerate(range(3))]
    got = eta_weights(rs, rns)
    expect(len(got) == 3, f"one weight per concept: expected 3, got {len(got)}")
    expect(not any(torch.is_tensor(g) and g.requires_grad for g in got),
           "the weights carry a gradient: eta weighs the losses, it is not optimised (detach it)")
    expect(abs(float(got[0]) - 1) < 1e-6, "the first concept's weight must be 1 (everything is relative to it)")
    for k, (g, ref) in enumerate(zip(got, gcirs.eta_weights(rs, rns))):
        expect_close(float(g), ref, f"eta_{k + 1}", rtol=1e-4)


@exercise("02.3", "Eq. (4), momentum early stopping")
def _check_02_3(stop_step):
    sequences = [[0.5 * 0.97 ** i - 0.02 for i in range(300)], [0.01] * 50, [-1.0] * 40,
                 [0.02 * math.cos(i / 5) - 0.004 for i in range(200)]]
    for k, losses in enumerate(sequences):
        for alpha, tau, warmup in ((0.9, 0.0, 10), (0.5, -0.003, 3), (0.9, 0.05, 0)):
            mon = gcirs.MomentumStop(alpha, tau, warmup, cap=len(losses))
            ref = next((i + 1 for i, loss in enumerate(losses) if mon.update(loss) and mon.reason.startswith("L_mom")),
                       None)
            got = stop_step(losses, alpha, tau, warmup)
            expect(got == ref, f"sequence {k} with alpha={alpha}, tau={tau}, warmup={warmup}: you stop "
                               f"{'never' if got is None else f'after step {got}'}, which is "
                               f"{'too early' if ref is not None and (got is not None and got < ref) else 'not right'}"
                               " (check the momentum's start value, the strict '<', and which steps may stop)")


# ------------------------------------------------------------------------------------------ notebook 03
@exercise("03.1", "Eq. (8), the matrix A_i")
def _check_03_1(stack_rows):
    model = _model()
    prompts = ["", "a red circle in checkered style", "an object in dotted style"]
    expect_close(stack_rows(model, prompts), nullspace.stack_rows(model, prompts).float(), "A for three prompts",
                 rtol=1e-5)


@exercise("03.2", "Eq. (9), a basis of the null space by SVD")
def _check_03_2(null_basis):
    model = _model()
    A = nullspace.stack_rows(model, ["", "a red circle in checkered style", "a blue star in dotted style"])
    S = null_basis(A)
    ref = nullspace.null_space(A)
    expect(torch.is_tensor(S) and S.dim() == 2 and S.shape[0] == A.shape[1],
           f"S must be a (d_in, dim) matrix with d_in = {A.shape[1]}, got "
           f"{tuple(S.shape) if torch.is_tensor(S) else type(S).__name__}")
    S = S.double()
    expect(S.shape[1] == ref.dim, f"your null space has dimension {S.shape[1]}: "
                                  + ("too small: the tolerance cuts too much, or not all d_in right singular "
                                     "vectors are there" if S.shape[1] < ref.dim
                                     else "too large, it keeps directions A does not annihilate"))
    expect(torch.allclose(S.T @ S, torch.eye(S.shape[1], dtype=S.dtype), atol=1e-8), "S's columns are not orthonormal")
    res = float(torch.linalg.matrix_norm(A.double() @ S, ord=2))
    expect(res <= 1e3 * ref.tol, f"||A S||_2 = {res:.2e}: S leaves the null space")


@exercise("03.3", "the leakage certificate of an increment")
def _check_03_3(leakage):
    model = _model()
    d = sepme.bundled_deltas(model, ("striped",))[0]
    for prompt in ("", "a red circle in checkered style", "a blue star in striped style"):
        expect_close(float(leakage(model, d.tensors, prompt)), nullspace.leakage(model, d, [prompt])[prompt],
                     f"the leakage on {prompt!r}", rtol=1e-3, atol=1e-9)


# ------------------------------------------------------------------------------------------ notebook 04
@exercise("04.1", "SepME_2: the prompts stage t protects")
def _check_04_1(stage_prompts):
    concepts = as_concepts(_model(), ["striped", "checkered", "dotted"], n_ref=1)
    ref = sepme.protected_sets(concepts, "iterative")
    for t in (2, 3):
        got = stage_prompts(concepts, t)
        expect(isinstance(got, (list, tuple)) and all(isinstance(p, str) for p in got),
               f"stage {t}: expected a list of prompt strings")
        expect(set(got) == set(ref[t - 1]), f"stage {t}: {len(set(got) - set(ref[t - 1]))} prompt(s) too many, "
                                             f"{len(set(ref[t - 1]) - set(got))} missing")


@exercise("04.2", "a scaled combination of increments")
def _check_04_2(combined_weights):
    model = _model()
    ds = sepme.bundled_deltas(model)
    for scales in ([1, 0, 1], [0.5, 1, -1]):
        got = combined_weights(model, ds, scales)
        ref = edited_weights(model, ds, scales)
        expect(isinstance(got, dict) and set(got) == set(ref),
               "expected a dict {parameter name: weight} over every edited matrix")
        for k in ref:
            expect_close(got[k], ref[k].float(), f"the weight {k} with scales {scales}", rtol=1e-5)


@exercise("04.3", "SepME_2 stage t: an increment projected into null(A_t)")
def _check_04_3(project_to_stage):
    model = _model()
    concepts = as_concepts(model, ["striped", "checkered", "dotted"], n_ref=1)
    names = model.kv_weight_names()[:4]
    dW = {k: _rand(*p.shape, seed=j) for j, (k, p) in enumerate(model.params(names).items())}
    for t in (2, 3):
        got = project_to_stage(model, concepts, t, dW)
        expect(isinstance(got, dict) and set(got) == set(dW), f"stage {t}: expected a dict over the same matrices")
        S = nullspace.decoupled_increment(model, "x", sepme.protected_sets(concepts, "iterative")[t - 1], 1.0, 1,
                                          1.0, 0.0).basis.double()
        for k, v in dW.items():
            expect(torch.is_tensor(got[k]) and got[k].shape == v.shape, f"stage {t}, {k}: shape must stay {tuple(v.shape)}")
            g = got[k].double()
            expect(float((g - g @ S @ S.T).norm()) <= 1e-4 * float(v.norm()),
                   f"stage {t}: the result still changes prompts of A_t (it leaves null(A_t))")
            expect(float(((v.double() - g) @ S).norm()) <= 1e-4 * float(v.norm()),
                   f"stage {t}: you removed a part of dW that lies in null(A_t): protect only what stage t may "
                   "not change")


# ------------------------------------------------------------------------------------------ notebook 05
@exercise("05.1", "where the erased images go: the share of each judged style")
def _check_05_1(style_shares):
    model, judge = _model(), _judge()
    imgs = generate(model, eval_prompts(model, "striped", 6), range(6), sepme.bundled_deltas(model), [1, 0, 0], steps=8)
    got = style_shares(judge, imgs)
    expect(isinstance(got, dict) and set(got) == set(judge.heads_labels["style"]),
           "expected a dict with one entry per style the judge knows (0 for the styles no image got)")
    expect(abs(sum(got.values()) - 1) < 1e-6, "the shares must add up to 1 (each image is judged as one style)")
    for label in got:
        expect_close(float(got[label]), accuracy(judge, imgs, "style", label), f"the share judged {label!r}", atol=1e-6)


@exercise("05.2", "ACC against the strength s of one increment")
def _check_05_2(acc_vs_strength):
    model, judge = _model(), _judge()
    ds, strengths = sepme.bundled_deltas(model), [1.0]
    got = acc_vs_strength(model, judge, ds, "checkered", strengths, 4, 8)
    expect(isinstance(got, (list, tuple)) and len(got) == len(strengths), "expected a list: one ACC per strength")
    for s, a in zip(strengths, got):
        ref = acc_table(model, judge, ["checkered"], 4, deltas=ds, scales=[0.0, s, 0.0], steps=8)["checkered"]
        expect(abs(float(a) - ref) <= 1 / 4 + 1e-9, f"ACC of 'checkered' at s = {s} is off by more than one image: "
               "scale the increment of the concept you measure, with the other increments off")


@exercise("05.3", "the smallest strength that erases, read off a measured curve")
def _check_05_3(smallest_erasing_strength):
    curves = [([0, .5, 1, 1.5], [1, .6, .05, 0]), ([0, .25, .5, .75, 1], [.9, .05, .5, .02, 0]),
              ([0, 1, 2], [1, .1, 0]), ([0, 1], [.05, 0]), ([0, 1, 2], [1, .9, .8])]
    for s, acc in curves:
        got = smallest_erasing_strength(s, acc, 0.1)
        if min(acc) > 0.1:
            expect(got is None, f"curve {acc}: never reaches the threshold, expected None")
            continue
        expect(got is not None and s[0] <= got <= s[-1], f"curve {acc}: {got} is not a strength within the curve")
        expect(all(a > 0.1 for x, a in zip(s, acc) if x < got - 1e-9), f"curve {acc}: {got} is not the first crossing")
        expect(abs(float(np.interp(got, s, acc)) - 0.1) < 1e-6 or got == s[0],
               f"curve {acc}: the curve is not at the threshold at {got} (interpolate linearly between measurements)")


# ------------------------------------------------------------------------------------------ notebook 06
@exercise("06.1", "UCE's closed form for one matrix")
def _check_06_1(uce_edit):
    W, Ke, V, Kp = (_rand(*sh, seed=k, dtype=torch.float64) for k, sh in enumerate(((6, 5), (3, 5), (3, 6), (2, 5))))
    expect_close(uce_edit(W, Ke, V, Kp, 0.5, 0.0, 0.0), W, "with e = p = 0 (only the ridge) W' must be W", rtol=1e-8)
    for lam, e, p in ((0.5, 1.0, 0.1), (0.1, 3.0, 1.0), (2.0, 0.3, 0.0)):
        ref = _closed_form.closed_form_edit(W, Ke, V, Kp, lam=lam, erase_scale=e, preserve_scale=p)[0]
        expect_close(uce_edit(W, Ke, V, Kp, lam, e, p), ref, f"W' for lam={lam}, e={e}, p={p} (compare the "
                     "numerator term by term)", rtol=1e-6)


@exercise("06.2", "ESD-x's negatively guided loss")
def _check_06_2(esd_step_loss):
    model = _model()
    s = _methods.settings("esd", model, steps=3, batch=2, params="kv", eta=1.5)
    concepts = as_concepts(model, ["striped"], n_ref=4)
    ref = _finetune.esd(model, concepts, s)  # the library's ESD-x loop; yours runs in the same loop below
    got = _finetune.finetune(model, concepts, s, lambda X, T, E, I, w: esd_step_loss(model, X, T, E, w, s["eta"]),
                             "esd", False)
    expect(abs(got.info["loss"][0] - ref.info["loss"][0]) <= 1e-5 * ref.info["loss"][0],
           "the first step's loss differs from ESD-x's: check the target's sign and the prompts the frozen model reads")
    expect(max(float(v.abs().max()) for v in got.tensors.values()) > 0, "no gradient reaches the edited weights")
    for i in (1, 2):
        expect_close(got.info["loss"][i], ref.info["loss"][i], f"the loss at step {i + 1} (after training with "
                     "your loss: does the prediction use the edited weights, the target the frozen ones?)", rtol=1e-3)


@exercise("06.3", "RECE's derived embedding (Eq. 8)")
def _check_06_3(derive_embedding):
    W_old = {f"m{i}": _rand(4 + i, 5, seed=10 + i) for i in range(3)}
    W_new = {k: w + 0.3 * _rand(*w.shape, seed=20 + i) for i, (k, w) in enumerate(W_old.items())}
    c = _rand(2, 3, 5, seed=30)
    same = derive_embedding(W_old, W_old, c, 1e-9)
    expect_close(same, c, "for an unedited model (W' = W, reg -> 0) c' must be c", rtol=1e-4)
    for reg in (1e-3, 1.0):
        expect_close(derive_embedding(W_new, W_old, c, reg), _closed_form.derive_embedding(W_new, W_old, c, reg),
                     f"c' with reg={reg} (check which weights multiply c, and where reg goes)", rtol=1e-4)


# ------------------------------------------------------------------------------------------ notebook 07
@exercise("07.1", "the summary of a combination table")
def _check_07_1(summary):
    for m, orig in (("SepME1", None), ("AbConcept", dict(VG=0.9, CE=0.8, PC=0.7, Others=0.95))):
        tab = _paper.combination_tab(m, 5)
        tab["original"] = dict(orig or tab["original"], Others=(orig or {}).get("Others", 1.0))
        ref = _evaluate.summarise(tab["rows"], tab["original"], ["VG", "CE", "PC"])
        got = summary(tab["rows"], tab["original"], ["VG", "CE", "PC"])
        expect(isinstance(got, dict), f"expected a dict of the three summary numbers, got {type(got).__name__}")
        for k, what in (("erased_acc_max", "an erased concept in its column"),
                        ("others_ratio_min", "a kept class, over its original ACC"),
                        ("restoration_drift_max", "an increment's concept left out of the column (not 'Others')")):
            expect(k in got, f"the summary lacks {k!r}")
            expect_close(float(got[k]), ref[k], f"{m} (Table 5), {k} (the worst case of {what})", rtol=1e-6)


@exercise("07.2", "||dTheta||_p of a combination of increments")
def _check_07_2(l1_p):
    model = _model()
    ds = sepme.bundled_deltas(model)
    for sub in (ds[:1], ds[1:], ds):
        got = l1_p([d.tensors for d in sub])
        ref = _deltas.Delta("sum", "sum", _deltas.combine(sub), ds[0].base).l1_norm()
        expect_close(got, ref, f"||dTheta||_p of the sum of {len(sub)} increment(s)", rtol=1e-4)
    return f"(the sum of all three: {l1_p([d.tensors for d in ds]):.1f}; the three alone add up to " \
           f"{sum(d.l1_norm() for d in ds):.1f})"


@exercise("07.3", "1 - SSIM, the stand-in for LPIPS")
def _check_07_3(one_minus_ssim):
    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = (0.7 * a + 0.3 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    smooth = torch.nn.functional.avg_pool2d(a, 5, 1, 2)
    expect(abs(float(one_minus_ssim(a, a))) < 1e-5, "identical images must give 1 - SSIM = 0")
    for x, y, what in ((a, b, "noisy images"), (smooth, a, "a blurred image and its original"), (b, a, "swapped")):
        expect_close(float(one_minus_ssim(x, y)), _perceptual.one_minus_ssim(x, y), f"1 - SSIM of {what} (check the "
                     "window, the constants, valid positions only, and the mean over channels, positions, images)",
                     rtol=1e-3, atol=1e-6)

