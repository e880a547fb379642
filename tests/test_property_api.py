"""Property-based test (hypothesis) of the public API with random wrong input: ``erase``, ``combine``, ``applied``,
``leakage``, ``Delta.save``/``load``, ``save_lora``/``from_lora`` and ``generate`` either succeed with a finite,
correct result, or raise one of the library's own errors (``sepme_lib.SepmeError``) whose message names the argument.
Draws are mostly invalid; valid ones stay tiny (1-2 DDIM steps, SepME capped at 1 step) so the file runs in well
under a minute on the bundled model."""
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sepme_lib as sm  # noqa: E402
from sepme_lib.deltas import Delta  # noqa: E402

NAN, INF = float("nan"), float("inf")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                derandomize=True)

# values of the wrong type, shape, size or finiteness (and a few right ones)
junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2, 10**9]),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF, -INF, 1e30, -0.0]),
                 st.text(max_size=6), st.binary(max_size=4), st.lists(st.integers(-3, 3), max_size=3),
                 st.lists(st.floats(allow_nan=True), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()),
                 st.just(torch.full((2, 2), NAN)), st.just(torch.zeros(0)), st.just(object()))


def _names(*words) -> str:
    return "|".join(words)


def check(call, argument: str):
    """``call()``'s result, or ``None`` when it raised a SepmeError naming ``argument`` (a regex); anything else
    fails the test."""
    try:
        return call()
    except sm.SepmeError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        assert re.search(argument, str(e), re.I), f"{type(e).__name__}: {e!r} does not name {argument!r}"
        return None


@pytest.fixture(scope="module")
def tiny():
    return sm.load_model("tiny", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def pair(tiny):
    d = sm.erase(tiny, ["striped"], method="uce", n_ref=2)[0]
    e = Delta("dotted", "uce", {k: 0.5 * v for k, v in d.tensors.items()}, d.base)
    return d, e


def _finite(tensors: dict) -> bool:
    return all(torch.isfinite(v).all() for v in tensors.values())


@FAST
@given(scales=st.one_of(junk, st.lists(junk, min_size=2, max_size=2),
                        st.dictionaries(st.sampled_from(["striped", "dotted", "x"]), junk, max_size=2)))
def test_combine(pair, scales):
    out = check(lambda: sm.combine(list(pair), scales), _names("scale", "delta"))
    if out is not None:
        assert set(out) <= set(pair[0].tensors) and _finite(out)


@FAST
@given(deltas=st.one_of(junk, st.lists(junk, max_size=2)))
def test_combine_wrong_deltas(deltas):
    out = check(lambda: sm.combine(deltas), "delta")
    assert out is None or out == {}


@FAST
@given(scales=st.one_of(junk, st.lists(junk, min_size=2, max_size=2)))
def test_applied(tiny, pair, scales):
    before = {k: v.clone() for k, v in tiny.params(list(pair[0].tensors)).items()}

    def run():
        with sm.applied(tiny, list(pair), scales):
            return True

    check(run, _names("scale", "delta"))
    after = tiny.params(list(pair[0].tensors))
    assert all(torch.equal(before[k], after[k]) for k in before)   # the base weights come back, whatever happened


@FAST
@given(which=st.sampled_from(["delta", "nan", "junk", "dict"]), what=junk,
       prompts=st.one_of(junk, st.lists(st.one_of(st.text(max_size=12), junk), max_size=2)))
def test_leakage(tiny, pair, which, what, prompts):
    d = pair[0]
    deltas = {"delta": d, "junk": what, "dict": {k: v * what if isinstance(what, float) else v
                                                  for k, v in d.tensors.items()},
              "nan": Delta("n", "uce", {k: v * NAN for k, v in d.tensors.items()}, d.base)}[which]
    out = check(lambda: sm.leakage(tiny, deltas, prompts), _names("prompt", "delta", "leakage", "increment"))
    if out is not None:
        assert which in ("delta", "dict") and all(math.isfinite(v) and v >= 0 for v in out.values())


@FAST
@given(prompts=st.one_of(junk, st.lists(st.one_of(st.sampled_from(["a red star", "", "a blue circle"]), junk),
                                        min_size=0, max_size=2)),
       seeds=st.one_of(st.none(), junk), steps=st.one_of(st.sampled_from([1, 2]), junk),
       guidance=st.one_of(st.none(), junk))
def test_generate(tiny, prompts, seeds, steps, guidance):
    if isinstance(steps, int) and not isinstance(steps, bool) and 2 < steps <= 1000:
        steps = 2   # a valid but long run: keep the test fast (sizes beyond the limits stay as drawn)
    out = check(lambda: sm.generate(tiny, prompts, seeds, steps=steps, guidance=guidance),
                _names("prompt", "seed", "steps", "guidance", "memory"))
    if out is not None:
        assert out.dim() == 4 and out.shape[1] == 3 and torch.isfinite(out).all()
        assert 0 <= float(out.min()) and float(out.max()) <= 1


names = st.one_of(junk, st.text(alphabet="ab. \x00-_", max_size=8),
                  st.sampled_from(["", ".", "..", "a/", "a/.", "a/b", "x" * 300, "run.striped"]))


@FAST
@given(path=names, bad_tensor=st.booleans())
def test_save_and_load(pair, path, bad_tensor):
    d = pair[0]
    if bad_tensor:
        d = Delta("bad", d.method, {k: v * NAN for k, v in d.tensors.items()}, d.base)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / path if isinstance(path, str) and path.strip() else path
        saved = check(lambda: d.save(target), _names("path", "save", "delta", "NaN"))
        if saved is not None:
            assert not bad_tensor and saved.name.endswith(".safetensors") and Path(tmp) in saved.parents
            back = Delta.load(saved)
            assert back.name == d.name and all(torch.equal(back.tensors[k], v) for k, v in d.tensors.items())
        check(lambda: Delta.load(target), _names("path", "file", "delta", "safetensors", "no delta"))


@FAST
@given(folder=names, rank=st.one_of(st.none(), junk), bad_tensor=st.booleans())
def test_save_lora_and_from_lora(pair, folder, rank, bad_tensor):
    d = pair[0]
    if bad_tensor:
        d = Delta("bad", d.method, {k: v * NAN for k, v in d.tensors.items()}, d.base)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / folder if isinstance(folder, str) and folder.strip() else folder
        out = check(lambda: d.save_lora(target, rank=rank, verbose=False),
                    _names("folder", "rank", "lora", "path", "NaN"))
        if out is not None:
            assert not bad_tensor
            back = Delta.from_lora(out)
            assert back.name == d.name and _finite(back.tensors)
            if rank is None:
                assert all(torch.allclose(back.tensors[k], v, atol=1e-5) for k, v in d.tensors.items())
        check(lambda: Delta.from_lora(target), _names("folder", "lora", "safetensors"))


SETTINGS = {"sepme": ["lr", "beta", "lam", "tau", "alpha", "seed", "warmup", "soft", "protect", "anchor", "mode"],
            "uce": ["lam", "erase_scale", "preserve_scale", "keys", "official", "anchor", "preserve"]}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
@given(method=st.sampled_from(["sepme", "uce", "zzz", 5]), concepts=st.one_of(
           st.sampled_from([["striped"], "dotted", ["cubist"], ["striped", "striped"], [], 123, [None]]), junk),
       key=st.integers(0, 10), value=st.one_of(junk, st.sampled_from(["all", "tail", "joint", "a star"])))
def test_erase(tiny, method, concepts, key, value):
    extra = {}
    if method in SETTINGS:
        keys = SETTINGS[method]
        extra[keys[key % len(keys)]] = value
    if method == "sepme":
        extra.update(cap=1, single_warmup=0)
    out = check(lambda: sm.erase(tiny, concepts, method=method, n_ref=2, **extra),
                _names("method", "concept", "protect", "anchor", "preserve", "mode", "keys", "official",
                       *SETTINGS["sepme"], *SETTINGS["uce"], "prompt"))
    if out is not None:
        assert out and all(isinstance(d, Delta) and _finite(d.tensors) for d in out)
