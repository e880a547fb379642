"""Issue 18: the full-size random-weight SD 1.4 (built on the meta device: nothing allocated), the gpu-path benchmark
on the small random SD (every row, finite numbers, the JSON schema), and the null-space capacity at SD's dimensions."""
import json
import math

import pytest
import torch

from sepme_lib import bench, config, gpupath, nullspace, random_sd
from sepme_lib.concepts import Concept, CONCEPT_SETS
from sepme_lib.config import BadValue


def test_full_size_sd14_has_the_real_architecture_and_parameter_counts():
    with torch.device("meta"):
        unet, vae, text, sched = random_sd.full_parts()
    counts = dict(unet=unet, vae=vae, text_encoder=text)
    for name, m in counts.items():
        assert sum(p.numel() for p in m.parameters()) == random_sd.SD14_PARAMETERS[name], name
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 768 and unet.config.attention_head_dim == 8
    k = [n for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight")]
    assert len(k) == 16 and all(dict(unet.named_parameters())[n].shape[1] == 768 for n in k)
    assert text.config.hidden_size == 768 and text.config.num_hidden_layers == 12
    assert text.config.max_position_embeddings == 77 and text.config.vocab_size == 49408
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.beta_schedule) == (0.00085, 0.012,
                                                                                            "scaled_linear")
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"


def test_full_size_tokenizer_is_built_offline_with_clips_vocabulary_size(tmp_path):
    from transformers import CLIPTokenizer

    from sepme_lib.train_tiny import tiny_tokenizer_files

    tiny_tokenizer_files(random_sd.sd_words(), tmp_path)
    words = len(json.loads((tmp_path / "vocab.json").read_text()))
    random_sd.pad_vocabulary(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    assert len(tok) == random_sd.CLIP_VOCAB
    ids = tok("a painting in the style of Van Gogh", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < words  # known words are single tokens, never the padding entries
    with pytest.raises(BadValue, match="size must be one of"):
        random_sd.build_parts(tmp_path, size="huge")


def test_gpu_path_prints_every_row_on_the_small_random_sd(random_sd_folder, capsys):
    model = str(random_sd_folder["pipeline"])
    assert bench.main(["gpu-path", "--model", model, "--device", "cpu", "--in-process", "--repeats", "1",
                       "--steps", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("model", "device", "dtype", "torch", "diffusers", "transformers", "cpu", "torch_threads", "command",
                "rows", "notebooks", "capacity"):
        assert key in res, key
    rows = {r["op"]: r for r in res["rows"]}
    expected = set(gpupath.OPS) | {f"{k}_{p}" for k in ("reference_set", "combination_table") for p in config.PROFILES}
    assert set(rows) == expected
    for r in rows.values():
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert math.isfinite(r["peak_mem_gib"]) and r["peak_mem_gib"] > 0, r
        assert r["measured"] in (True, False) and (r["measured"] or r["basis"])
        assert r["device"] == "cpu" if r["measured"] else True
    assert rows["ddim_image"]["extrapolated"] and rows["ddim_image"]["shape"]["steps"] == 50
    assert rows["ddim_image"]["steps_measured"] == 2
    assert rows["null_space"]["shape"]["d_in"] == 256 and rows["null_space"]["shape"]["prompts"] == 9
    assert rows["train_sepme"]["shape"]["batch"] == 1  # the paper's batch (methods.DEFAULTS["sepme"]["sd"])
    nbs = res["notebooks"]
    assert len(nbs) == 3 * 10 and {n["profile"] for n in nbs} == {"ci", "full", "colab"}
    assert all(math.isfinite(n["seconds"]) and n["seconds"] > 0 and n["basis"] for n in nbs)


def test_gpu_path_refuses_what_it_cannot_measure(random_sd_folder, tmp_path):
    with pytest.raises(BadValue, match="--dtype fp16 is for a CUDA GPU"):
        gpupath.gpu_path(str(random_sd_folder["pipeline"]), "cpu", "fp16")
    with pytest.raises(BadValue, match="random_sd DIR --size full"):
        gpupath.gpu_path(str(tmp_path / "missing"), "cpu")
    with pytest.raises(BadValue, match="op must be one of"):
        gpupath.measure("nope", str(random_sd_folder["pipeline"]), "cpu")


def test_gpu_path_op_runs_in_its_own_process(random_sd_folder):
    row = gpupath.measure_isolated("null_space", str(random_sd_folder["pipeline"]), "cpu", repeats=1)
    assert row["op"] == "null_space" and row["measured"] and row["peak_mem_gib"] > 0
    assert row["shape"]["null_dim"] >= row["shape"]["formula_null_dim"]


def test_capacity_matches_hand_computed_values():
    c = nullspace.capacity(768, 77, 1)
    assert (c["rows"], c["null_dim"], c["max_prompts"]) == (77, 691, 9)
    assert nullspace.capacity(768, 77, 9)["null_dim"] == 768 - 685 == 83
    c10 = nullspace.capacity(768, 77, 10)
    assert c10["null_dim"] == 7 and not c10["fits"]  # about ten prompts fill SD's 768-wide key/value projection
    assert nullspace.capacity(768, 77, 13)["null_dim"] == 0
    assert nullspace.capacity(2048, 77, 1)["max_prompts"] == (2048 - 17) // 76 == 26
    assert nullspace.max_concepts(768, 77, 1) == 9 and nullspace.max_concepts(768, 77, 4) == 3
    assert nullspace.max_concepts(2048, 77, 4) == 7
    rows = {r["family"]: r for r in nullspace.capacity_rows()}
    assert rows["SD 1.4"]["null_dim"] == 83 and rows["SD 1.4"]["null_dim_next"] == 0
    assert rows["SDXL"]["null_dim"] == 2048 - 685
    with pytest.raises(BadValue, match="tokens"):
        nullspace.capacity(768, 1, 2)


def test_capacity_formula_is_the_measured_null_dimension(tiny_sd):
    prompts = [""] + [p for c in CONCEPT_SETS["sd"].erase for p in CONCEPT_SETS["sd"].prompts(c, 2)]
    d_in, L = tiny_sd.empty().shape[-1], tiny_sd.max_length
    for k in (1, 2, len(prompts)):
        ns = nullspace.null_space(nullspace.stack_rows(tiny_sd, prompts[:k]))
        bound = nullspace.capacity(d_in, L, k)["null_dim"]
        # exact for prompts that share only BOS; prompts sharing a longer prefix share those rows too (causal encoder)
        assert ns.dim == bound if k <= 2 else ns.dim >= bound, (k, ns.dim, bound)


def test_the_concept_that_no_longer_fits_fails_before_training(tiny_sd, monkeypatch):
    from sepme_lib import methods, sepme

    def no_training(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(sepme, "train", no_training)
    d_in, L = tiny_sd.empty().shape[-1], tiny_sd.max_length
    cs = CONCEPT_SETS["sd"]
    names = [c for c in cs.evaluate if c != "blank"]
    assert nullspace.max_concepts(d_in, L, 4) == 4  # the bound; prompts sharing prefixes leave a little more
    concepts = [Concept(n, cs.prompts(n, 4), torch.zeros(1, *tiny_sd.latent_shape)) for n in names]
    assert len(concepts) == 9 and not nullspace.capacity(d_in, L, 1 + 4 * 8)["fits"]
    with pytest.raises(nullspace.CapacityError, match=r"concept-level protection.*notebook 08") as e:
        methods.erase(tiny_sd, concepts, method="sepme")
    assert "fewer prompts per concept" in str(e.value)


def test_gpu_path_refuses_unknown_ops(tmp_path):
    with pytest.raises(BadValue, match="unknown or empty"):
        gpupath.gpu_path(str(tmp_path), device="cpu", ops="load,train_everything")


def test_full_size_sdxl_has_the_real_architecture_and_parameter_counts():
    with torch.device("meta"):
        unet, vae, text, text_2, sched = random_sd.full_parts_xl()
    for name, m in dict(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2).items():
        assert sum(p.numel() for p in m.parameters()) == random_sd.SDXL10_PARAMETERS[name], name
    k = [n for n, p in unet.named_parameters() if n.endswith("attn2.to_k.weight")]
    assert len(k) == 70 and all(dict(unet.named_parameters())[n].shape[1] == 2048 for n in k)  # 768 + 1280
    assert unet.config.addition_embed_type == "text_time" and unet.config.projection_class_embeddings_input_dim == \
        text_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    assert text.config.hidden_size + text_2.config.hidden_size == unet.config.cross_attention_dim
    assert vae.config.scaling_factor == 0.13025 and sched.config.timestep_spacing == "leading"


def test_a_failing_op_is_recorded_and_the_other_rows_kept(tmp_path, monkeypatch):
    """A long run keeps what it measured when one op dies (a full-size model killed for memory)."""
    def fake(op, *a, **k):
        if op == "rece":
            raise RuntimeError("gpu-path op 'rece' failed (exit -9 (killed: out of memory?)): ...")
        return dict(op=op, seconds=1.0, peak_mem_gib=2.0, measured=True)
    monkeypatch.setattr(gpupath, "measure_isolated", fake)
    res = gpupath.gpu_path(str(tmp_path), device="cpu", ops="uce,rece,speed")
    assert [r["op"] for r in res["rows"]] == ["uce", "speed"] and "notebooks" not in res
    assert res["failed"][0]["op"] == "rece" and "out of memory" in res["failed"][0]["error"]
    assert "| rece | failed |" in gpupath.markdown(res)
