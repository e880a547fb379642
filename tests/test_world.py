import numpy as np
import pytest

from sepme_lib import world
from sepme_lib.train_tiny import tiny_tokenizer_files


def test_render_is_deterministic_and_in_range():
    specs = world.random_specs(50, np.random.default_rng(3))
    a, b = world.render(specs, seed=7), world.render(specs, seed=7)
    assert a.shape == (50, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not np.array_equal(a, world.render(specs, seed=8))  # the seed moves the jitter


def test_every_style_and_shape_draws_something_different():
    base = world.render([world.Spec("circle", "blank", "red")], seed=0)[0]
    for st in world.STYLES[1:]:
        other = world.render([world.Spec("circle", st, "red")], seed=0)[0]
        assert np.abs(other - base).mean() > 0.01, st
    for sh in world.SHAPES[1:]:
        other = world.render([world.Spec(sh, "blank", "red")], seed=0)[0]
        assert np.abs(other - base).mean() > 0.01, sh


def test_captions_follow_the_grammar():
    assert world.caption("star", "striped", "red") == "a red star in striped style"
    assert world.caption("star", "blank", "red") == "a red star"
    assert world.caption(None, "dotted", None) == "an object in dotted style"
    assert world.concept_prompt("checkered") == "an object in checkered style"
    assert world.concept_prompt("star") == "a star"


def test_unknown_concept_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known styles: blank, striped"):
        world.concept_kind("cubist")
    with pytest.raises(ValueError, match="no prompt"):
        world.concept_prompt("blank")
    with pytest.raises(ValueError, match="known shapes"):
        world.check_names("shape", ["circle", "hexagon"])


def test_sample_batch_never_drops_the_style_phrase():
    rng = np.random.default_rng(0)
    imgs, caps, specs = world.sample_batch(400, rng)
    assert imgs.shape == (400, 3, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
    assert any(c == "" for c in caps)
    for c, s in zip(caps, specs):
        if c and s.style != "blank":
            assert f"in {s.style} style" in c


def test_reference_images_show_the_concept():
    x = world.reference_images("striped", 8, seed=1)
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1


def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    tiny_tokenizer_files(world.VOCABULARY, tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=16)
    for w in world.VOCABULARY:
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS, the word, EOS
