"""Issue 17, "nothing silent, nothing lost": one test per group of the second bad-input list. The data-loss tests do
what used to lose data (the same user action) and check that the data survives; the others check that what used to
give a silently wrong result, a hang or an obscure error now gives a clear error naming the argument and the fix."""
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sepme_lib as sm
from sepme_lib import checkpoint, cli, closed_form, config, deltas, gcirs, lora, methods, nullspace, speed, storage
from sepme_lib.concepts import ConceptError
from sepme_lib.config import BadType, BadValue, SepmeError, TooLarge
from sepme_lib.deltas import Delta, DeltaFileError
from sepme_lib.lora import LoraError
from sepme_lib.picture import grid_image


@pytest.fixture(scope="module")
def delta(tiny):
    return sm.erase(tiny, ["striped"], method="uce", n_ref=2)[0]


def _other(d, name="dotted", k=2.0):
    return Delta(name, d.method, {n: v * k for n, v in d.tensors.items()}, d.base, d.hparams, dict(d.info))


def _nan(d):
    t = {k: v.clone() for k, v in d.tensors.items()}
    t[next(iter(t))][0, 0] = float("nan")
    return t


# =========================================================================================== lose nothing
def test_save_keeps_the_given_name_and_never_replaces_another_delta(delta, tmp_path):
    striped, dotted = delta, _other(delta)
    a = striped.save(tmp_path / "run.striped")   # used to write run.safetensors ...
    b = dotted.save(tmp_path / "run.dotted")     # ... and this one replaced it
    assert (a.name, b.name) == ("run.striped.safetensors", "run.dotted.safetensors")
    assert Delta.load(a).name == "striped" and Delta.load(b).name == "dotted"
    with pytest.raises(DeltaFileError, match=r"holds delta 'striped'.*overwrite=True"):
        dotted.save(a)
    assert Delta.load(a).name == "striped"   # untouched
    (tmp_path / "notes.safetensors").write_text("my notes")
    with pytest.raises(DeltaFileError, match="not a sepme delta"):
        striped.save(tmp_path / "notes.safetensors")
    assert (tmp_path / "notes.safetensors").read_text() == "my notes"
    # asked for: replaced; the same delta again (a notebook re-run, bench.py's bundled files): replaced
    assert Delta.load(dotted.save(a, overwrite=True)).name == "dotted"
    assert dotted.save(a) == a
    assert striped.save(tmp_path / "sepme2_1").name == "sepme2_1.safetensors"   # notebook 04's call, no suffix
    assert striped.save(tmp_path / "sepme2_1").name == "sepme2_1.safetensors"
    for bad in ("", "  "):
        with pytest.raises(DeltaFileError, match="path is empty"):
            striped.save(bad)


def test_save_lora_never_replaces_a_users_files(delta, tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my thesis notes")
    with pytest.raises(LoraError, match="holds other files"):   # used to replace README.md with the model card
        delta.save_lora(folder)
    assert (folder / "README.md").read_text() == "my thesis notes" and len(os.listdir(folder)) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("project readme")
    for empty in ("", ".", " "):   # used to write into the current folder
        with pytest.raises(LoraError, match="not a new folder's name"):
            delta.save_lora(empty)
    assert (tmp_path / "README.md").read_text() == "project readme"
    assert not (tmp_path / lora.WEIGHTS).exists()
    # an earlier export of the same delta is replaced; of another delta only when asked
    out = delta.save_lora(tmp_path / "out" / "striped")
    assert delta.save_lora(out) == out and sorted(os.listdir(out)) == [lora.CARD, lora.WEIGHTS]
    with pytest.raises(LoraError, match="export of delta 'striped'.*overwrite=True"):
        _other(delta).save_lora(out)
    _other(delta).save_lora(out, overwrite=True)
    assert Delta.from_lora(out).name == "dotted"
    assert delta.save_lora("out2/striped").is_dir()   # the README's relative-path example still works


def test_a_full_disk_names_the_path_and_leaves_nothing_half_written(delta, tmp_path, monkeypatch):
    out = delta.save_lora(tmp_path / "striped")
    card = (out / lora.CARD).read_text()
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == lora.CARD:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    for target in (out, tmp_path / "fresh"):   # used to leave a 0-byte README.md and an error without a path
        with pytest.raises(LoraError, match=f"could not write {target}.*No space left"):
            delta.save_lora(target)
    monkeypatch.setattr(Path, "write_text", real)
    assert (out / lora.CARD).read_text() == card and Delta.from_lora(out).name == "striped"
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["striped"]   # no temporary folder left
    f = delta.save(tmp_path / "d.safetensors")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deltas, "save_file", no_space)
    with pytest.raises(DeltaFileError, match=f"could not write {f}.*No space left"):
        delta.save(f)
    monkeypatch.undo()
    assert Delta.load(f).name == "striped"


def test_two_erase_runs_into_one_out_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["erase", "--model", "tiny", "--concepts", "striped", "--method", "uce", "--eval-images", "0",
            "--out", str(out)]
    second = {}
    real = methods.erase

    def first_run_erasing(*a, **k):  # while the first run works, a second one starts into the same --out
        second["code"] = cli.main(argv[:4] + ["dotted"] + argv[5:])
        return real(*a, **k)

    monkeypatch.setattr(methods, "erase", first_run_erasing)
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert second["code"] == 2 and f"--out {out}: another run (pid {os.getpid()})" in err
    run, summary = json.loads((out / "erase_run.json").read_text()), json.loads((out / "erase_summary.json").read_text())
    assert run["concepts"] == summary["concepts"] == ["striped"] and summary["folders"] == ["striped"]
    assert not (out / storage.LOCK).exists()
    # a lock left by a killed run (its process is gone) is taken over, with a message
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (out / storage.LOCK).write_text(str(p.pid))
    monkeypatch.setattr(methods, "erase", real)
    assert cli.main(argv) == 0
    assert f"taking over the lock of pid {p.pid}" in capsys.readouterr().err


# ============================================================================================ nothing silent
def test_certificates_and_loaders_refuse_non_finite_values(tiny, delta, tmp_path):
    nan = Delta("x", delta.method, {k: v * float("nan") for k, v in delta.tensors.items()}, delta.base)
    with pytest.raises(BadValue, match="NaN or inf"):   # used to score 0.0, a perfect certificate
        sm.leakage(tiny, nan, [""])
    with pytest.raises(BadValue, match="NaN or inf"):
        sm.leakage(tiny, _nan(delta), ["a red star"])
    out = delta.save_lora(tmp_path / "ok")
    sd = load_file(str(out / lora.WEIGHTS))
    k = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[k][0, 0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    save_file(sd, str(bad / lora.WEIGHTS))
    with pytest.raises(LoraError, match=f"tensor '{k}' holds NaN"):
        Delta.from_lora(bad)
    code = cli.main(["generate", "--model", "tiny", "--lora", str(bad), "--prompts", "a star", "--seeds", "0",
                     "--backend", "diffusers", "--out", str(tmp_path / "g")])
    assert code == 2


def test_erased_and_protected_prompts_are_compared_by_tokens(tiny):
    c = sm.make_concepts(tiny, ["striped"], n_ref=2)[0]
    shout = "  " + c.prompt.upper().replace(" ", "   ")   # the tokenizer lower-cases and collapses spaces
    with pytest.raises(ConceptError, match="both erased and protected"):   # used to erase nothing (1.3e-8)
        sm.erase(tiny, [c], method="sepme", protect=[shout], cap=2)
    twin = sm.Concept("stripes2", list(c.prompts), c.latents)
    with pytest.raises(ConceptError, match="'striped' and 'stripes2' both erase"):   # used to cancel each other
        sm.erase(tiny, [c, twin], method="sepme", cap=2)
    with pytest.raises(ConceptError, match="both erased and preserved"):   # used to weaken UCE
        sm.erase(tiny, [c], method="uce", preserve=[p.upper() for p in c.prompts])
    with pytest.raises(ConceptError, match="both erased and preserved"):
        sm.erase(tiny, [c], method="mace", general=[c.prompts[1].title()])


def test_a_string_for_protect_is_one_prompt(tiny):
    d = sm.erase(tiny, ["striped"], method="sepme", protect="a blue circle", cap=1, n_ref=2)[0]
    assert "a blue circle" in d.info["protected"] and "a" not in d.info["protected"]
    with pytest.raises(ConceptError, match="protect must hold prompt strings"):
        sm.erase(tiny, ["striped"], method="sepme", protect=[1, 2], cap=1)


@pytest.mark.parametrize("bad, match", [(dict(keys="all"), "only with official=False"),
                                        (dict(keys="words"), "only with official=False"),
                                        (dict(keys="zzz"), "keys must be one of"),
                                        (dict(official="no"), "official must be True or False")])
def test_uce_and_rece_refuse_settings_they_would_ignore(tiny, bad, match):
    for m in ("uce", "rece"):
        with pytest.raises(methods.MethodError, match=match):
            sm.erase(tiny, ["striped"], method=m, **bad)
    a = sm.erase(tiny, ["striped"], method="uce", keys="words", official=False, n_ref=2)[0]
    b = sm.erase(tiny, ["striped"], method="uce", n_ref=2)[0]
    assert not deltas.same_tensors(a, b)   # the setting now does something


def test_null_space_refuses_a_prior_of_another_width():
    with pytest.raises(BadValue, match=r"prior must be a \(n, 5\) tensor"):   # used to be reshaped silently
        sm.null_space(torch.randn(3, 5), prior=torch.randn(2, 10))
    assert sm.null_space(torch.randn(3, 5), prior=torch.randn(2, 5)).exact_dim == 2


def test_the_same_adapter_twice_is_refused(tiny, delta, tmp_path):
    a = delta.save_lora(tmp_path / "striped")
    copy = tmp_path / "renamed"
    copy.mkdir()
    save_file(load_file(str(a / lora.WEIGHTS)), str(copy / lora.WEIGHTS))   # no metadata: named after its folder
    code = cli.main(["generate", "--model", "tiny", "--lora", str(a), str(copy), "--prompts", "a star",
                     "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "g")])
    assert code == 2 and not (tmp_path / "g").exists()   # used to apply it at double strength
    with pytest.raises(BadValue, match="hold the same increment"):
        sm.combine([delta, Delta("renamed", "lora", dict(delta.tensors), delta.base)])


def test_minor_silent_results(tiny, delta, monkeypatch, tmp_path):
    two = [delta, _other(delta)]
    with pytest.raises(BadValue, match=r"no scale for delta\(s\) \['dotted'\]"):   # used to mean 0
        sm.combine(two, {"striped": 1.0})
    assert set(sm.combine(two, {"striped": 1.0, "dotted": 0.0})) == set(delta.tensors)
    imgs = torch.rand(3, 3, 8, 8)
    imgs[1, 0, 0, 0] = float("nan")
    with pytest.raises(BadValue, match=r"image\(s\) \[1\] hold NaN"):   # used to be a black tile
        grid_image(imgs)
    monkeypatch.setenv("SEPME_DTYPE", "fp8")   # used to be ignored by the command line
    code = cli.main(["generate", "--model", "tiny", "--prompts", "a star", "--out", str(tmp_path / "g")])
    assert code == 2 and not (tmp_path / "g").exists()


# ========================================================================================= no hangs
def test_sizes_are_checked_before_starting(tiny, tmp_path, capsys):
    t0 = time.time()
    assert cli.main(["generate", "--model", "tiny", "--prompts", "a star", "--seeds", "0-9999999",
                     "--out", str(tmp_path / "g")]) == 2
    assert "more than 10000" in capsys.readouterr().err
    with pytest.raises(TooLarge, match=r"n_general=1000000000.*GiB.*lower n_general"):
        sm.erase(tiny, ["striped"], method="mace", n_general=10**9)
    with pytest.raises(TooLarge, match="sample fewer"):
        tiny.sample(["a star"] * 2 * 10**7, steps=1)
    assert time.time() - t0 < 30


# ========================================================================== clear, early errors (groups)
def test_concept_latents_are_checked(tiny):
    c = sm.make_concepts(tiny, ["striped"], n_ref=2)[0]
    with pytest.raises(ConceptError, match="hold NaN"):
        sm.Concept("x", ["a star"], c.latents * float("nan"))
    with pytest.raises(ConceptError, match=r"latents of shape \(2, 3, 5, 5\).*model.to_latent"):
        sm.erase(tiny, [sm.Concept("x", ["a star"], torch.zeros(2, 3, 5, 5))], method="uce")


@pytest.mark.parametrize("method, bad, match", [
    ("sepme", dict(beta=1e39), "beta .* at most 1e3"), ("esd", dict(eta="x"), "eta must be a finite number"),
    ("esd", dict(eta=float("nan")), "eta must be a finite number"), ("all_but_one", dict(kappa=5), "kappa must be in"),
    ("esd", dict(seed="abc"), "seed must be a finite number"), ("esd", dict(seed=2**70), "seed must be in"),
    ("sepme", dict(seed=2**70), "seed must be a whole number"), ("uce", dict(anchor=123), "anchor must be a prompt"),
    ("uce", dict(preserve=123), "preserve must be a prompt"), ("sepme", dict(anchor=[1]), "anchor must hold prompt")])
def test_settings_and_arguments_are_checked_first(tiny, method, bad, match):
    with pytest.raises(SepmeError, match=match):
        sm.erase(tiny, ["striped"], method=method, cap=1, **bad) if method == "sepme" else \
            sm.erase(tiny, ["striped"], method=method, **bad)


def test_delta_files_and_calls(tiny, delta, tmp_path, clf):
    f = delta.save(tmp_path / "d.safetensors")
    with pytest.raises(BadType, match="scales must be a list"):
        sm.combine([delta], 5)
    with pytest.raises(BadValue, match=r"device='meta'.*cannot run"):   # not "truncated"
        Delta.load(f, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(BadValue, match=r"device='cuda'.*CUDA is not available"):
            Delta.load(f, device="cuda")
    meta = dict(format=deltas.FORMAT, name="", method="uce", base=delta.base, hparams="{}", info="{}")
    k = next(iter(delta.tensors))
    save_file({k: delta.tensors[k]}, str(tmp_path / "noname.safetensors"), metadata=meta)
    with pytest.raises(DeltaFileError, match=f"{tmp_path / 'noname.safetensors'}: metadata field 'name' is empty"):
        Delta.load(tmp_path / "noname.safetensors")
    save_file({k: delta.tensors[k]}, str(tmp_path / "list.safetensors"), metadata=dict(meta, name="x", info="[1,2]"))
    with pytest.raises(DeltaFileError, match="'info' must be a JSON object"):
        Delta.load(tmp_path / "list.safetensors")
    with pytest.raises(BadValue, match="guidance must be a finite number of at most 1000"):
        sm.generate(tiny, ["a star"], [0], deltas=[delta], guidance=1e30, steps=1)
    with pytest.raises(BadValue, match=r"steps .* 1\.\.1000"):
        sm.generate(tiny, ["a star"], [0], steps=5000)
    with pytest.raises(BadType, match="judge must be a classifier"):
        sm.acc_table(tiny, None, ["striped"], 2)


def test_lora_folders_that_are_incomplete(delta, tmp_path):
    out = delta.save_lora(tmp_path / "ok")
    sd = load_file(str(out / lora.WEIGHTS))
    for name, edit, match in [("no_b", lambda d: d.pop(next(k for k in d if k.endswith("lora_B.weight"))),
                               "no partner"),
                              ("ranks", lambda d: d.update({(k := next(x for x in d if x.endswith("lora_A.weight"))):
                                                            d[k][:-1]}), "ranks must match")]:
        bad = dict(sd)
        edit(bad)
        (tmp_path / name).mkdir()
        save_file(bad, str(tmp_path / name / lora.WEIGHTS))
        with pytest.raises(LoraError, match=match):
            Delta.from_lora(tmp_path / name)


@pytest.mark.parametrize("argv, match", [
    (["evaluate", "--seed", "-5"], "--seed -5"), (["generate", "--steps", "5000", "--prompts", "a"], "--steps 5000"),
    (["generate", "--guidance", "1e30", "--prompts", "a"], "--guidance"),
    (["generate", "--seeds", "18446744073709551616", "--prompts", "a"], "at most 2\\*\\*63"),
    (["generate", "--model", "TINY", "--prompts", "a"], "spelled 'tiny'")])
def test_command_line_flags_are_named(argv, match, tmp_path, capsys):
    if "--model" not in argv:
        argv = argv + ["--model", "tiny"]
    t0 = time.time()
    assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert time.time() - t0 < 10 and not (tmp_path / "o").exists()   # before the model loads


def test_every_library_error_is_a_sepme_error():
    classes = [cli.InputError, closed_form.ClosedFormError, ConceptError, deltas.BaseModelMismatch, DeltaFileError,
               LoraError, methods.MethodError, nullspace.CapacityError, speed.SpeedError, checkpoint.CheckpointMismatch,
               checkpoint.Interrupted, gcirs.ErasureDiverged, storage.StorageError, BadValue, BadType, TooLarge]
    assert all(issubclass(c, sm.SepmeError) for c in classes)
    assert issubclass(BadValue, ValueError) and issubclass(BadType, TypeError)
    assert issubclass(config.UnknownName, KeyError) and str(config.UnknownName("x y")) == "x y"


def test_judges_widgets_and_custom_concepts(tiny, clf, delta, tmp_path, capsys):
    from sepme_lib import widgets

    f = delta.save(tmp_path / "striped.safetensors")
    with pytest.raises(BadValue, match="a sepme delta file, not a judge"):
        sm.load_classifier(path=f)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(config.CLASSIFIER_PATH.read_bytes()[:1000])
    with pytest.raises(BadValue, match="may be truncated"):
        sm.load_classifier(path=cut)
    assert cli.main(["evaluate", "--model", "tiny", "--judge", str(f), "--out", str(tmp_path / "o")]) == 2
    assert f"--judge {f}" in capsys.readouterr().err
    with pytest.raises(BadValue, match="lo < hi"):
        widgets.CombinationWidget(tiny, clf, [delta], scale_range=(2, -1))
    with pytest.raises(BadValue, match="repeats must be >= 1"):
        widgets.benchmark_refresh(tiny, clf, [delta], repeats="3")
    c = sm.make_concepts(tiny, ["striped"], n_ref=2)[0]
    mine = sm.Concept("mine", ["a red star in wavy style"], c.latents)
    with pytest.raises(closed_form.ClosedFormError, match="custom Concept needs .*preserve="):
        sm.erase(tiny, [mine], method="uce", anchor="a red star")
    assert sm.erase(tiny, [mine], method="uce", anchor="a red star", preserve=["a blue circle"])[0].tensors
