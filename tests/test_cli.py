"""The command line: bad input refused before the model loads, the erase -> generate -> evaluate round trip on the
bundled model and on a random SD folder, resumable erase (a resumed run gives the increments of an uninterrupted one,
in the library and after a real kill of ``python -m sepme_lib erase``), and the ``sepme`` console script."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sepme_lib as sm
from sepme_lib import cli, lora, sepme
from sepme_lib.checkpoint import Checkpoint, CheckpointMismatch, Interrupted

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--set", "cap=6", "single_warmup=0", "batch=2", "--n-ref", "8", "--quiet"]


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    """The bundled increments exported as LoRA folders."""
    out = tmp_path_factory.mktemp("loras")
    return {d.name: d.save_lora(out / d.name, verbose=False) for d in sepme.bundled_deltas(tiny)}


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "load_model", refuse)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["erase", "--model", "tiny", "--concepts", "striped", "--method", "nope"], "unknown method 'nope'"),
    (["erase", "--model", "tiny", "--concepts", "cubism"], "unknown concept 'cubism'"),
    (["erase", "--model", "tiny", "--concepts", "striped", "striped"], "a concept repeats"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--method", "esd", "--mode", "joint"], "--mode is SepME"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--set", "lr"], "KEY=VALUE"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--set", "lr=-1"], "lr must be"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--set", "speed=3"], "unknown setting"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--dtype", "fp16"], "float32"),
    (["erase", "--model", "tiny", "--concepts", "striped", "--rtol", "2"], "--rtol"),
    (["generate", "--model", "tiny", "--prompts", "a", "--lora", "{missing}"], "no folder"),
    (["generate", "--model", "tiny", "--prompts", "a", "--lora", "{lora}:abc"], "is not a number"),
    (["generate", "--model", "tiny", "--prompts", "a", "--lora", "{lora}:nan"], "finite"),
    (["generate", "--model", "tiny", "--prompts", "a", "--lora", "{empty}"], "has no pytorch_lora_weights"),
    (["generate", "--model", "tiny", "--prompts", "a", "--seeds", "5-2"], "runs backwards"),
    (["generate", "--model", "tiny", "--prompts", "a", "--seeds", "1,x"], "is not a seed"),
    (["generate", "--model", "{empty}", "--prompts", "a"], "no model_index.json"),
    (["generate", "--model", "./nowhere", "--prompts", "a"], "no such folder"),
    (["evaluate", "--model", "tiny", "--table", "mine"], "--table"),
    (["evaluate", "--model", "tiny", "--concepts", "cubism"], "unknown concept"),
    (["evaluate", "--model", "tiny", "--judge", "/no/judge"], "--judge"),
])
def test_bad_input_is_refused_before_the_model_loads(argv, message, tmp_path, capsys, no_model, loras):
    (tmp_path / "empty").mkdir()
    fill = dict(missing=tmp_path / "missing", lora=loras["striped"], empty=tmp_path / "empty")
    argv = [a.format(**{k: str(v) for k, v in fill.items()}) for a in argv] + ["--out", tmp_path / "out"]
    code, out = run(argv, capsys)
    assert code == 2 and message in out.err, out.err


def test_more_bad_input(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    code, out = run(["generate", "--model", "tiny", "--prompts", "a", "--out", tmp_path / "file" / "sub"], capsys)
    assert code == 2 and "is a file" in out.err
    if not torch.cuda.is_available():
        code, out = run(["evaluate", "--model", "sd-folder", "--dtype", "fp16", "--out", tmp_path / "o"], capsys)
        assert code == 2 and "CUDA" in out.err
        code, out = run(["evaluate", "--model", "tiny", "--device", "cuda", "--out", tmp_path / "o"], capsys)
        assert code == 2 and "CUDA is not available" in out.err
    with pytest.raises(SystemExit) as e:  # argparse: --concepts is required
        cli.main(["erase", "--model", "tiny", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    (tmp_path / "prompts.txt").write_text("# comment\n\n")
    code, out = run(["generate", "--model", "tiny", "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "o"],
                    capsys)
    assert code == 2 and "no prompts" in out.err


def test_parse_helpers(tmp_path):
    assert cli.parse_seeds("0-3,10") == [0, 1, 2, 3, 10] and cli.parse_seeds("7") == [7]
    with pytest.raises(cli.InputError, match="repeats"):
        cli.parse_seeds("1,1")
    (tmp_path / "p.txt").write_text("a red star\n# no\n\na blue circle\n")
    assert cli.parse_prompts([str(tmp_path / "p.txt")]) == ["a red star", "a blue circle"]
    assert cli.parse_prompts(["a", "b"]) == ["a", "b"]
    assert cli.parse_settings(["cap=5", "anchor='x'", "l1=w"], "sepme") == ({"cap": 5, "l1": "w"}, {"anchor": "x"})


def test_round_trip_on_the_bundled_model(tmp_path, capsys):
    code, out = run(["erase", "--model", "tiny", "--concepts", "striped", "dotted", "--out", tmp_path / "e",
                     "--eval-images", "1", *QUICK], capsys)
    assert code == 0, out.err
    assert "exact" in out.out and "peak memory" in out.out
    for name in ("striped", "dotted"):
        card = (tmp_path / "e" / name / "README.md").read_text()
        assert "## ACC of the run" in card and "| + all |" in card
        assert sm.Delta.from_lora(tmp_path / "e" / name).info["steps"] == 6
    code, out = run(["generate", "--model", "tiny", "--lora", f"{tmp_path / 'e' / 'striped'}:1.5",
                     tmp_path / "e" / "dotted", "--prompts", "a red star in striped style", "a blue circle",
                     "--seeds", "0-2", "--steps", "2", "--out", tmp_path / "g", "--quiet"], capsys)
    assert code == 0, out.err
    assert len(list((tmp_path / "g").glob("p*_seed*.png"))) == 6 and (tmp_path / "g" / "contact_sheet.png").exists()
    code, out = run(["evaluate", "--model", "tiny", "--lora", tmp_path / "e" / "striped", tmp_path / "e" / "dotted",
                     "--images", "1", "--steps", "2", "--out", tmp_path / "v", "--quiet"], capsys)
    assert code == 0, out.err
    res = json.loads((tmp_path / "v" / "table.json").read_text())
    assert [r["subset"] for r in res["rows"]] == [["striped"], ["dotted"], ["striped", "dotted"]]
    assert "| original |" in (tmp_path / "v" / "table.md").read_text() and "erased_acc_max" in out.out


def test_round_trip_on_a_random_sd_folder(random_sd_folder, tmp_path, capsys):
    sd, judge = random_sd_folder["pipeline"], random_sd_folder["clip"]
    code, out = run(["erase", "--model", sd, "--concepts", "Van Gogh", "Picasso", "--out", tmp_path / "e",
                     "--set", "cap=2", "--n-ref", "2", "--eval-images", "0", "--quiet", "--rank", "8"], capsys)
    assert code == 0, out.err
    assert "truncated" in out.out and (tmp_path / "e" / "Van_Gogh" / lora.WEIGHTS).exists()
    code, out = run(["generate", "--model", sd, "--lora", f"{tmp_path / 'e' / 'Van_Gogh'}:-0.5",
                     tmp_path / "e" / "Picasso", "--prompts", "Van Gogh", "--seeds", "0-1", "--steps", "2",
                     "--backend", "diffusers", "--out", tmp_path / "g", "--quiet"], capsys)
    assert code == 0, out.err
    code, out = run(["evaluate", "--model", sd, "--judge", judge, "--lora", tmp_path / "e" / "Van_Gogh",
                     tmp_path / "e" / "Picasso", "--images", "1", "--steps", "2", "--out", tmp_path / "v", "--quiet"],
                    capsys)
    assert code == 0, out.err
    res = json.loads((tmp_path / "v" / "table.json").read_text())
    assert res["family"] == "sd" and len(res["rows"]) == 3 and "Van Gogh" in res["concepts"]


def test_erase_resumes_bit_identically_after_an_interruption(tiny, tmp_path, capsys):
    """Library level (every loop: SepME separate, iterative's G-CiRs stage, ESD) and command line."""
    cs = sm.make_concepts(tiny, ["striped", "dotted"], n_ref=8)
    for method, kw in (("sepme", dict(cap=8, batch=2, single="plain", mode="iterative")),
                       ("esd", dict(steps=5, batch=2))):
        ref = sm.erase(tiny, cs, method=method, **kw)
        with pytest.raises(Interrupted):
            sm.erase(tiny, cs, method=method, checkpoint=Checkpoint(tmp_path / method, every=2, stop_after=3), **kw)
        res = sm.erase(tiny, cs, method=method, checkpoint=Checkpoint(tmp_path / method, every=2), **kw)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for a, b in zip(ref, res) for k in a.tensors), method
    with pytest.raises(CheckpointMismatch):  # another run's checkpoint is refused
        sm.erase(tiny, cs, method="esd", checkpoint=Checkpoint(tmp_path / "esd"), steps=6, batch=2)
    base = ["erase", "--model", "tiny", "--concepts", "striped", "--eval-images", "0", *QUICK]
    with pytest.raises(Interrupted):
        cli.main([str(a) for a in base + ["--out", tmp_path / "cut", "--stop-after-step", "4"]])
    code, out = run([a if a != "striped" else "dotted" for a in base] + ["--out", tmp_path / "cut"], capsys)
    assert code == 2 and "holds another run" in out.err
    assert run(base + ["--out", tmp_path / "cut"], capsys)[0] == 0
    assert run(base + ["--out", tmp_path / "whole"], capsys)[0] == 0
    a, b = (load_file(tmp_path / d / "striped" / lora.WEIGHTS) for d in ("cut", "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_erase_process_resumes(tmp_path, capsys):
    """``python -m sepme_lib erase`` killed (SIGKILL) after its first save; restarted, it ends with the increments of
    an uninterrupted run. Also: the ``sepme`` console script is declared."""
    argv = ["erase", "--model", "tiny", "--concepts", "striped", "--eval-images", "0", "--checkpoint-every", "2",
            "--set", "cap=16", "single_warmup=0", "batch=2", "--n-ref", "8", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "sepme_lib", *argv, "--out", str(tmp_path / "k")],
                            env=dict(os.environ, SEPME_THREADS=str(torch.get_num_threads())),  # same float sums
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = tmp_path / "k" / ".checkpoints" / "SepME_striped.pt"
    t0 = time.time()
    while not ck.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    assert ck.exists(), "the process saved no checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ck, weights_only=True)
    assert not saved["finished"] and saved["step"] < 16
    assert run([*argv, "--out", tmp_path / "k"], capsys)[0] == 0
    assert run([*argv, "--out", tmp_path / "w"], capsys)[0] == 0
    a, b = (load_file(tmp_path / d / "striped" / lora.WEIGHTS) for d in ("k", "w"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sepme"] == "sepme_lib.cli:main"


@pytest.mark.parametrize("method, settings", [
    ("sepme", ["cap=2", "single_warmup=0", "batch=1"]), ("gcirs", ["cap=2", "batch=1"]),
    ("esd", ["steps=2", "batch=1"]), ("ablating", ["steps=2", "batch=1", "n_anchor=2", "anchor_steps=2"]),
    ("fmn", ["steps=2", "batch=1"]), ("all_but_one", ["steps=2", "batch=1"]), ("uce", []), ("rece", ["epochs=1"]),
    ("mace", ["n_general=8"])])
def test_erase_exports_every_method(method, settings, tmp_path, capsys):
    argv = ["erase", "--model", "tiny", "--concepts", "striped", "--method", method, "--out", tmp_path,
            "--eval-images", "0", "--n-ref", "4", "--quiet"] + (["--set", *settings] if settings else [])
    code, out = run(argv, capsys)
    assert code == 0, out.err
    (folder,) = [p.parent for p in tmp_path.glob(f"*/{lora.WEIGHTS}")]
    d = sm.Delta.from_lora(folder)
    assert d.name == "striped" and f"`{d.method}`" in (folder / "README.md").read_text()
    assert d.info["lora"]["exact"] and d.info["lora"]["recon_error"] < 1e-6
