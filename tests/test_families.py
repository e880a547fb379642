"""Model families as data (``sepme_lib.families``): one entry per family, no branch on a family's name anywhere else,
a new family added by one entry, and a clear error for an unknown one."""
import ast
import dataclasses
import types
from pathlib import Path

import pytest

from sepme_lib import cli, concepts, config, families, methods, widgets
from sepme_lib.families import FAMILIES, Family

PKG = Path(__file__).resolve().parent.parent / "sepme_lib"
REGISTRY = "families.py"
COMPARE = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def is_family(node: ast.AST) -> bool:
    """Whether an operand is a family or its name: ``family``, ``model.family``, ``_family(model)``, ``fam.name``,
    ``family_of(model).name`` (a field of the entry, ``family_of(model).judge``, is not)."""
    if isinstance(node, ast.Call):
        node = node.func
    last = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    if "family" in last.lower():
        return True
    return isinstance(node, ast.Attribute) and last == "name" and "fam" in ast.unparse(node.value).lower()


def family_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comparison in ``source`` that tests a family against something (``model.family ==
    "tiny"``, ``_family(model) != "tiny"``, ``args.family in ("sd",)``)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Compare) and any(isinstance(op, COMPARE) for op in node.ops)
                and any(is_family(x) for x in [node.left, *node.comparators])):
            out.append((node.lineno, ast.get_source_segment(source, node)))
    return out


def test_no_module_but_the_registry_branches_on_a_family():
    bad = [f"{p.name}:{line}: {text}" for p in sorted(PKG.glob("*.py")) if p.name != REGISTRY
           for line, text in family_comparisons(p.read_text())]
    assert not bad, "compare a family only in families.py; elsewhere read a field of families.family_of(...):\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("snippet", ['if model.family == "tiny":\n    pass\n', 'x = args.family != "sd"\n',
                                     'ok = _family(model) != "tiny"\n', 'y = cs.family in ("tiny", "sd")\n',
                                     'z = "sd" == family\n', 'w = families.family_of(m).name != "sd"\n',
                                     'v = fam.name == "tiny"\n'])
def test_the_family_scan_can_fail(snippet):
    assert family_comparisons(snippet), snippet


def test_the_family_scan_passes_lookups():
    assert not family_comparisons('f = families.family_of(model)\nif f.judge == "clip":\n    pass\n'
                                  'b = FAMILIES["tiny"].batch\n')


# ------------------------------------------------------------------------------------------ every entry complete
def defaults_families() -> set:
    names = {f for table in methods.DEFAULTS.values() for f in table}
    return names | set(methods.TAU_FACTORS) | set(methods.CONCEPT_LEVEL)


def test_every_family_of_the_settings_tables_has_an_entry():
    assert defaults_families() <= set(FAMILIES), defaults_families() - set(FAMILIES)
    assert set(FAMILIES) == {"tiny", "sd", "sdxl"}
    assert {f.settings_key for f in FAMILIES.values()} == defaults_families()  # every family finds its settings
    assert FAMILIES["sdxl"].settings_key == "sd" and FAMILIES["sdxl"].pipeline == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_entry_provides_every_field(name):
    fam = FAMILIES[name]
    assert fam.name == name and fam.title
    sd = FAMILIES["sd"]
    for f in dataclasses.fields(Family):
        value = getattr(fam, f.name)
        assert value is not None and type(value) is type(getattr(sd, f.name)), (name, f.name, value)
    assert fam.judge in families.JUDGES and fam.batch >= 1 and fam.cli_batch >= 1
    assert fam.evaluate[0] == "blank" and len(fam.erase) == 3 and all(c in fam.evaluate for c in fam.erase)
    for c in fam.erase:  # every rule answers for every erased concept
        ps = fam.prompts(c, 4)
        assert len(ps) == 4 and all(isinstance(p, str) and p for p in ps)
        assert [fam.anchor(p, c) for p in ps] and fam.kind(c) in ("style", "shape")
        assert len(fam.eval_prompts(c, 3)) == len(fam.eval_targets(c, 3)) == 3
        assert fam.concept_captions(c)
    assert fam.preserve_prompts(list(fam.erase[:1])) and fam.general_prompts(set(fam.erase[:1]), n=4)
    assert fam.blank_prompts() and fam.default_prompts(list(fam.erase[:1]))


def test_the_bundled_and_hub_names_pick_their_family(monkeypatch):
    assert families.model_family("tiny").name == "tiny"
    assert families.model_family("CompVis/stable-diffusion-v1-4").name == "sd"
    assert families.model_family("some/folder", pipeline="StableDiffusionXLPipeline").name == "sdxl"
    assert families.model_family("some/folder", pipeline="StableDiffusionPipeline").name == "sd"
    monkeypatch.delenv("SEPME_BATCH", raising=False)
    assert FAMILIES["tiny"].sample_batch() == 64 and FAMILIES["sd"].sample_batch() == 8
    monkeypatch.setenv("SEPME_BATCH", "3")
    assert FAMILIES["sd"].sample_batch() == 3
    with pytest.raises(config.BadType, match="families.get"):
        config.sample_batch("sd")  # the old call names its replacement


# ------------------------------------------------------------------------------------------ adding a family
@pytest.fixture
def added():
    """Register families for one test and remove them after."""
    names = []

    def add(fam):
        names.append(fam.name)
        return families.register(fam)

    yield add
    for n in names:
        FAMILIES.pop(n, None)


def test_a_copy_of_sd_under_another_name_resolves_through_the_registry(added):
    fam = added(dataclasses.replace(FAMILIES["sd"], name="sd-copy", model_names=("my/sd-copy",)))
    model, sd = types.SimpleNamespace(family="sd-copy", name="m"), types.SimpleNamespace(family="sd", name="s")
    assert families.model_family("my/sd-copy") is fam and "sd-copy" in concepts.CONCEPT_SETS
    cs = concepts.concept_set(model)
    assert cs.family == "sd-copy" and cs.erase == FAMILIES["sd"].erase and cs.evaluate == FAMILIES["sd"].evaluate
    assert cs.prompts("Van Gogh", 3) == concepts.concept_set(sd).prompts("Van Gogh", 3)
    erased = ["Van Gogh"]
    for fn in (concepts.preserve_prompts, concepts.general_prompts, concepts.prior_captions):
        assert fn(model, erased) == fn(sd, erased), fn.__name__
    for fn in (concepts.concept_captions, concepts.listed_prompts, concepts.caption_split):
        assert fn(model, "Picasso") == fn(sd, "Picasso") and fn(model, "blank") == fn(sd, "blank"), fn.__name__
    assert widgets.default_prompts([types.SimpleNamespace(name="Cezanne")], model=model) == \
        widgets.default_prompts([types.SimpleNamespace(name="Cezanne")], model=sd)
    assert methods.course_settings("sepme", model, {"sd_cap": 3}) == {"cap": 3}
    assert cli.batch_size(types.SimpleNamespace(batch=None, family="sd-copy")) == 4
    assert "sd-copy" not in [f for f in FAMILIES if f in ("tiny", "sd")]


def test_a_new_family_is_one_entry(added):
    added(Family(name="toy", title="a toy model", erase=("Monet", "Turner", "Klee"),
                 evaluate=("blank", "Monet", "Turner", "Klee", "Miro"), templates=("{}", "art by {}"),
                 anchors=("", "art"), captions=("{}", "art by {}", "a cat by {}"), blank_captions=("art", "a cat")))
    model = types.SimpleNamespace(family="toy", name="toy")
    cs = concepts.concept_set(model)
    assert cs.prompts("Monet", 3) == ["Monet", "art by Monet", "Monet"]
    assert cs.anchor("art by Monet", "Monet") == "art" and cs.kind("Miro") == "style"
    assert cs.eval_prompts("blank", 2) == ["", ""] and cs.eval_targets("Klee", 1) == [{"style": "Klee"}]
    assert concepts.preserve_prompts(model, ["Monet", "Turner"], k=2) == ["Klee", "art by Klee", "Miro", "art by Miro"]
    assert concepts.listed_prompts(model, "blank") == ["art"]
    assert concepts.concept_captions(model, "Klee") == ["Klee", "art by Klee", "a cat by Klee"]
    with pytest.raises(concepts.ConceptError, match="unknown concept 'Van Gogh' for the toy concept set"):
        cs.check("Van Gogh")


def test_register_refuses_a_duplicate_or_an_incomplete_entry(added):
    with pytest.raises(config.BadValue, match="already registered"):
        families.register(dataclasses.replace(FAMILIES["sd"]))
    with pytest.raises(config.BadValue, match="judge"):
        families.register(dataclasses.replace(FAMILIES["sd"], name="x", judge="eyes"))
    with pytest.raises(config.BadValue, match="erased concepts"):
        families.register(dataclasses.replace(FAMILIES["sd"], name="x", erase=("Monet",)))
    with pytest.raises(config.BadType):
        families.register({"name": "x"})
    assert "x" not in FAMILIES


# ------------------------------------------------------------------------------------------ unknown family
def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(config.UnknownName, match="unknown model family 'sd3'; known families: tiny, sd, sdxl") as e:
        families.get("sd3")
    assert isinstance(e.value, config.SepmeError) and isinstance(e.value, KeyError)
    with pytest.raises(config.UnknownName, match="known families"):
        concepts.concept_set(types.SimpleNamespace(family="sd3"))
    with pytest.raises(config.UnknownName, match="known families"):
        concepts.preserve_prompts(types.SimpleNamespace(family="sd3"), [])
    with pytest.raises(config.BadType, match="family"):
        families.family_of(42)
    assert "sd3" not in concepts.CONCEPT_SETS and concepts.CONCEPT_SETS.get("sd3") is None
