"""Bad input and faults get a clear error that names the problem and the fix, raised before any long work; nothing
half-written is left on disk. One test per group of the inputs a user tried (docs/DESIGN.md, "Bad input")."""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import sepme_lib as sm
from sepme_lib import bench, config, deltas, methods, nullspace
from sepme_lib.concepts import ConceptError
from sepme_lib.deltas import Delta, DeltaFileError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def delta(tiny):
    return sm.erase(tiny, ["striped"], method="uce", n_ref=2)[0]


def _nan_delta(d):
    t = {k: v.clone() for k, v in d.tensors.items()}
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    return Delta("broken", d.method, t, d.base, d.hparams, d.info)


# ------------------------------------------------------------------------------------------------ non-finite
def test_non_finite_values_are_refused_everywhere(tiny, clf, delta, tmp_path):
    bad = _nan_delta(delta)
    with pytest.raises(ValueError, match="NaN or inf"):
        deltas.edited_weights(tiny, [bad])
    with pytest.raises(ValueError, match="NaN or inf"):
        bad.save(tmp_path / "bad")
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match="finite"):
        sm.combine([delta], [float("nan")])
    with pytest.raises(ValueError, match="finite"):
        sm.combine([delta], [float("inf")])
    with pytest.raises(ValueError, match="NaN or inf"):
        clf.predict(torch.full((2, 3, 32, 32), float("nan")))
    w = {k: v * float("nan") for k, v in deltas.edited_weights(tiny, [delta]).items()}
    with pytest.raises(FloatingPointError, match="not finite"):
        tiny.sample(["a red star"], seeds=[0], steps=2, weights=w)
    # a file with a NaN tensor (written by someone else) is refused on load, naming the tensor
    from safetensors.torch import save_file
    meta = dict(format=deltas.FORMAT, name="x", method="uce", base=delta.base, hparams="{}", info="{}")
    k = next(iter(delta.tensors))
    save_file({k: torch.full((2, 2), float("nan"))}, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=f"tensor '{k}'"):
        Delta.load(tmp_path / "nan.safetensors")


# ------------------------------------------------------------------------------------------ no-op requests
def test_a_concept_that_is_also_protected_is_refused(tiny):
    c = sm.make_concepts(tiny, ["striped"], n_ref=2)[0]
    with pytest.raises(ValueError, match="both erased and protected"):
        sm.erase(tiny, [c], method="sepme", protect=[c.prompts[1]], cap=2)
    with pytest.raises(ValueError, match="both erased and preserved"):
        sm.erase(tiny, [c], method="uce", preserve=[c.prompt])
    with pytest.raises(ConceptError, match="empty prompt"):
        sm.Concept("nothing", [""], c.latents)
    with pytest.raises(ConceptError, match="empty prompt"):
        sm.erase(tiny, [sm.Concept("x", ["a star", " "], c.latents)], method="uce")


def test_prompts_longer_than_the_tokenizer_are_refused(tiny):
    long = "a red star in striped style " * 4
    with pytest.raises(ValueError, match=r"has \d+ tokens .* at most 16"):
        tiny.embed([long])
    with pytest.raises(ValueError, match="Shorten the prompt"):
        tiny.sample([long], seeds=[0], steps=1)


def test_unknown_words_warn_once_per_word(tiny):
    tiny._warned.discard("zebra")  # the model is shared by the session: another test may have met the word first
    with pytest.warns(UserWarning, match="zebra") as rec:
        tiny.embed(["a zebra in striped style"])
    assert sum("zebra" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.embed(["a zebra in dotted style"])  # the same word again: no second warning


# ---------------------------------------------------------------------------------------------- delta files
def test_delta_files_say_which_file_and_what(tiny, delta, tmp_path):
    p = delta.save(tmp_path / "d.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(p.read_bytes()[:200])
    with pytest.raises(DeltaFileError, match="trunc.safetensors.*not a readable safetensors"):
        Delta.load(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(DeltaFileError, match="text.safetensors"):
        Delta.load(tmp_path / "text.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DeltaFileError, match="not a sepme delta"):
        Delta.load(tmp_path / "foreign.safetensors")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata=dict(format=deltas.FORMAT, name="x"))
    with pytest.raises(DeltaFileError, match="metadata lacks"):
        Delta.load(tmp_path / "meta.safetensors")
    meta = dict(format=deltas.FORMAT, name="x", method="m", base="b", hparams="{", info="{}")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "json.safetensors"), metadata=meta)
    with pytest.raises(DeltaFileError, match="'hparams' is not valid JSON"):
        Delta.load(tmp_path / "json.safetensors")
    with pytest.raises(FileNotFoundError, match="no delta file"):
        Delta.load(tmp_path / "missing.safetensors")
    with pytest.raises(DeltaFileError, match="is a folder"):
        Delta.load(tmp_path)
    # a changed tensor shape
    k = next(iter(delta.tensors))
    wrong = Delta(delta.name, delta.method, {**delta.tensors, k: delta.tensors[k][:, :-1]}, delta.base)
    with pytest.raises(ValueError, match=f"tensor '{k}' has shape"):
        deltas.edited_weights(tiny, [wrong])
    # saving where the parent is a file, or onto a folder
    with pytest.raises(DeltaFileError, match="is a file, not a folder"):
        delta.save(p / "inside.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(DeltaFileError, match="it is a folder"):
        delta.save(tmp_path / "dir.safetensors")


def test_a_killed_save_leaves_no_temp_file(delta, tmp_path, monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(deltas, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        delta.save(tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_delta_records_what_made_it(tiny, tmp_path):
    for method, kw in (("uce", {}), ("sepme", dict(cap=2, batch=1)), ("esd", dict(steps=1, batch=1))):
        d = sm.erase(tiny, ["striped"], method=method, n_ref=2, **kw)[0]
        back = Delta.load(d.save(tmp_path / method))
        assert back.method == d.method and back.hparams == d.hparams and back.base == tiny.fingerprint()
        assert back.version == sm.__version__ and back.info["model"] == "tiny"
        assert back.info["prompts"] == sm.concept_set(tiny).prompts("striped")
        for key in ("anchors", "protected"):
            assert key in back.info, (method, key)
    assert back.info["prompts"] and Delta.load(tmp_path / "uce.safetensors").info["anchors"]


# ------------------------------------------------------------------------------------------------- sizes
def test_sizes_must_be_positive(tiny):
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            tiny.sample(["a star"], seeds=[0], steps=steps)
    with pytest.raises(ValueError, match="seeds must be whole numbers >= 0"):
        tiny.sample(["a star"], seeds=[-1])
    with pytest.raises(ValueError, match="no prompts"):
        tiny.sample([])
    with pytest.raises(ConceptError, match="n_ref must be a whole number >= 1"):
        sm.make_concepts(tiny, ["striped"], n_ref=0)
    with pytest.raises(ConceptError, match="no concept names"):
        sm.make_concepts(tiny, [])
    with pytest.raises(ConceptError, match="no concepts given"):
        sm.erase(tiny, [], method="uce")
    with pytest.raises(ValueError, match="cap must be a whole number >= 1"):
        sm.erase(tiny, ["striped"], method="sepme", cap=0)
    with pytest.raises(methods.MethodError, match="steps must be a whole number >= 1"):
        sm.erase(tiny, ["striped"], method="esd", steps=0)
    with pytest.raises(methods.MethodError, match="lr must be a finite number > 0"):
        sm.erase(tiny, ["striped"], method="esd", lr=-1.0)
    with pytest.raises(ValueError, match="whole number >= 1"):
        sm.acc_table(tiny, None, ["striped"], 0)
    with pytest.raises(ValueError, match="at least one prompt"):
        sm.leakage(tiny, {}, [])


@pytest.mark.parametrize("argv, match", [
    (["quality", "--images-per-concept", "0"], "whole number >= 1"),
    (["quality", "--images-per-concept", "-2"], "whole number >= 1"),
    (["world", "--steps", "3"], "unrecognized arguments: --steps"),
    (["sepme", "--profile", "huge"], "invalid choice"),
    (["relatives", "--methods", "uce,esd-u"], "unknown or empty"),
])
def test_bench_command_line_refuses_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code != 0
    assert match in (str(e.value.code) + capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- combinations
def test_combinations_refuse_repeats_and_non_numbers(delta):
    with pytest.raises(ValueError, match="appear more than once"):
        sm.combine([delta, delta])
    with pytest.raises(TypeError, match="must be a number"):
        sm.combine([delta], ["strong"])
    with pytest.raises(TypeError, match="must be a number"):
        sm.combine([delta], [True])
    with pytest.raises(TypeError, match="expected Delta objects"):
        sm.combine([delta.tensors])
    assert sm.combine([delta], [torch.tensor(0.5)])


# ----------------------------------------------------------------------------------------- device, threads
@pytest.mark.parametrize("dev, match", [("meta", "cannot run the models"), ("mps", "MPS is not available"),
                                        ("cuda", "CUDA is not available"), ("gpu0", "unknown device")])
def test_bad_devices_are_named(dev, match, monkeypatch):
    monkeypatch.setenv("SEPME_DEVICE", dev)
    with pytest.raises((ValueError, RuntimeError), match=match):
        config.get_device()


def test_threads_are_honoured_on_import():
    env = dict(os.environ, SEPME_THREADS="1", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", "import sepme_lib, torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-500:]
    env["SEPME_THREADS"] = "lots"
    out = subprocess.run([sys.executable, "-c", "import sepme_lib"], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode != 0 and "SEPME_THREADS must be a whole number" in out.stderr


def test_course_runner_reports_errors_without_colour_codes():
    from sepme_lib import course

    text = course.error_text(RuntimeError("\x1b[0;31mValueError\x1b[0m: boom in cell 3"))
    assert "\x1b" not in text and "ValueError: boom in cell 3" in text


# ----------------------------------------------------------------------------------------- kept behaviour
def test_errors_that_already_worked(tiny, tmp_path, monkeypatch):
    with pytest.raises(ConceptError, match="unknown concept 'cubist'"):
        sm.make_concepts(tiny, ["cubist"])
    with pytest.raises(ConceptError, match="repeat"):
        sm.make_concepts(tiny, ["striped", "striped"])
    with pytest.raises(ValueError, match="unknown PROFILE"):
        config.profile("huge")
    with pytest.raises(FileNotFoundError, match="classifier weights not found"):
        sm.load_classifier(path=tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="load_model needs"):
        sm.load_model("")
    t0 = time.time()
    with pytest.raises(RuntimeError, match="local folder"):
        sm.load_model("CompVis/not-on-this-machine")
    assert time.time() - t0 < 9
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        sm.load_model(str(tmp_path))
    with pytest.raises(nullspace.CapacityError):
        nullspace.check_capacity(nullspace.null_space(torch.randn(250, 256)), 20, "x", 16)
