"""The sharded evaluation: the work plan does not depend on the number of processes, shards gathered in-process give
the single-process table, and ``accelerate launch`` with two CPU processes writes the same table as one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sepme_lib import cli, scaleout, sepme
from sepme_lib.scaleout import Shard, evaluation_table, plan, table_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    return [d.save_lora(out / d.name, verbose=False) for d in sepme.bundled_deltas(tiny)[:2]]


def test_plan_is_independent_of_the_process_count():
    chunks = plan(4, ["a", "b"], 50, batch=16)
    assert len(chunks) == 4 * 2 * 4 and {b - a for _, _, a, b in chunks} == {12, 13}
    for count in (1, 2, 3, 7):
        mine = [[k for k in range(len(chunks)) if k % count == i] for i in range(count)]
        assert sorted(k for m in mine for k in m) == list(range(len(chunks)))
    rows = table_rows([type("D", (), {"name": n}) for n in "xyz"], [1, -0.5, 2])
    assert len(rows) == 8 and rows[0]["subset"] == [] and rows[-1]["scales"] == {"x": 1, "y": -0.5, "z": 2}
    with pytest.raises(ValueError, match="unknown table"):
        table_rows([], [], "tables")


def test_gathered_shards_equal_one_process(tiny, clf):
    ds = sepme.bundled_deltas(tiny)[:2]
    kw = dict(concepts=["blank", "striped"], n=3, steps=2, batch=2, progress=False)
    one = evaluation_table(tiny, clf, ds, [1.0, -0.5], **kw)
    parts = []
    # process 1 runs first and hands what it gathers to process 0's gathers (what accelerate's gather_object does)
    assert evaluation_table(tiny, clf, ds, [1.0, -0.5], shard=Shard(1, 2, tiny.device, parts.append), **kw) is None
    two = evaluation_table(tiny, clf, ds, [1.0, -0.5],
                           shard=Shard(0, 2, tiny.device, lambda x: list(x) + parts.pop(0)), **kw)
    one.pop("run"), two.pop("run")
    assert one == two and len(one["rows"]) == 3


def test_two_accelerate_processes_write_the_single_process_table(loras, tmp_path, capsys):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate is not installed (pip install -e '.[dev]')")
    args = ["evaluate", "--model", "tiny", "--lora", f"{loras[0]}:1.0", f"{loras[1]}:0.5", "--images", "3",
            "--steps", "3", "--batch", "2", "--concepts", "blank", "striped", "checkered", "--quiet", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1)
    try:
        assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    launcher = str(Path(sys.executable).parent / "accelerate")
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                        "-m", "sepme_lib", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", SEPME_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "table.json").read_text()) for d in ("one", "two"))
    run1, run2 = one.pop("run"), two.pop("run")
    assert run1["processes"] == 1 and run2["processes"] == 2 and set(run2["memory"]) == {"process 0", "process 1"}
    assert one == two  # every ACC and every predicted label
    assert (tmp_path / "two" / "table.md").read_text() == (tmp_path / "one" / "table.md").read_text()


def test_accelerate_cpu_launcher_single_process_is_flagged(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="runs ONE process"):
        s = scaleout.shard_from_environment(torch.device("cpu"))
    assert s.count == 1 and s.main
