"""Pipeline text: parsing, formatting, named pipelines, errors, and the pass registry."""
from __future__ import annotations

import typing
from dataclasses import dataclass

import pytest

import orca_compiler
from orca_compiler import NAMED_PIPELINES, PipelineError, format_pipeline, parse_pipeline
from orca_compiler.pass_base import Pass, PassResult, get_pass_class, register_pass, unregister_pass
from orca_compiler.pipeline import PassSpec

LIBRARY_PASSES = ("dce", "cse", "fold-constants", "fold-bn", "decompose-rnn", "fuse", "low-rank")


# A throwaway pass whose options cover every kind of option type the parser coerces.
@dataclass
class _KindsOptions:
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    label: str = "x"
    mode: typing.Literal["fast", "exact"] = "fast"
    names: tuple[str, ...] = ()


class _KindsPass(Pass):
    """Test pass with one option of each kind."""

    name = "test-option-kinds"
    Options = _KindsOptions

    def run(self, ir, ctx):
        return PassResult(ir, False)


@pytest.fixture
def kinds_pass():
    register_pass(_KindsPass)
    yield _KindsPass
    unregister_pass(_KindsPass.name)


# -- round trips -----------------------------------------------------------------------------

CANONICAL = [
    "dce",
    "cse,dce",
    "fold-constants,fold-bn,cse,dce",
    "fold-constants{max_growth=4.0}",
    "fold-constants{max_growth=4.0,always_fold_numel=16},fold-bn,dce",
    "dce,dce,cse",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_format_of_parse_is_identity_on_canonical_text(text):
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_parse_keeps_order_names_and_options():
    specs = parse_pipeline("fold-constants{max_growth=4.0,always_fold_numel=16},fold-bn,dce")
    assert [s.name for s in specs] == ["fold-constants", "fold-bn", "dce"]
    assert specs[0].options == (("max_growth", "4.0"), ("always_fold_numel", "16"))
    assert specs[1].options == () and specs[2].options == ()


def test_parse_normalizes_whitespace_and_empty_elements():
    specs = parse_pipeline("  cse , ,dce{ } , fold-constants{ max_growth = 3.0 }")
    assert format_pipeline(specs) == "cse,dce,fold-constants{max_growth=3.0}"
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_parse_of_format_is_identity_on_specs():
    specs = [PassSpec("fold-constants", (("max_growth", "8.0"),)), PassSpec("cse"), PassSpec("dce")]
    assert format_pipeline(specs) == "fold-constants{max_growth=8.0},cse,dce"
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_options_are_coerced_to_declared_types(kinds_pass):
    text = "test-option-kinds{flag=true,count=3,ratio=0.25,label=abc,mode=exact,names=a:b}"
    (spec,) = parse_pipeline(text)
    assert format_pipeline([spec]) == text
    opts = spec.instantiate().options
    assert opts == _KindsOptions(flag=True, count=3, ratio=0.25, label="abc", mode="exact", names=("a", "b"))
    assert parse_pipeline("test-option-kinds{flag=off}")[0].instantiate().options.flag is False


def test_instantiated_options_reach_the_pass():
    (spec,) = parse_pipeline("fold-constants{max_growth=4.0,always_fold_numel=16}")
    pass_ = spec.instantiate()
    assert type(pass_) is get_pass_class("fold-constants")
    assert pass_.options.max_growth == 4.0 and isinstance(pass_.options.max_growth, float)
    assert pass_.options.always_fold_numel == 16 and isinstance(pass_.options.always_fold_numel, int)


# -- named pipelines -------------------------------------------------------------------------


def test_o0_is_empty():
    assert parse_pipeline("O0") == []
    assert format_pipeline(parse_pipeline("O0")) == ""


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_named_pipelines_expand_to_their_passes(level):
    specs = parse_pipeline(level)
    assert specs, f"{level} should not be empty"
    assert format_pipeline(specs) == NAMED_PIPELINES[level]
    assert all(s.name in orca_compiler.registered_passes() for s in specs)


def test_o1_folds_bn_and_cleans_up():
    names = [s.name for s in parse_pipeline("O1")]
    for name in ("fold-constants", "fold-bn", "decompose-rnn", "cse", "dce"):
        assert name in names
    assert names.index("fold-bn") < names.index("dce")


def test_named_pipeline_expands_inside_a_larger_pipeline():
    specs = parse_pipeline("dce,O1,cse")
    assert format_pipeline(specs) == "dce," + NAMED_PIPELINES["O1"] + ",cse"
    assert [s.name for s in parse_pipeline("O0,dce")] == ["dce"]


# -- errors ----------------------------------------------------------------------------------


def test_unknown_pass_lists_registered_passes():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("cse,no-such-pass,dce")
    msg = str(info.value)
    assert "no-such-pass" in msg
    for name in LIBRARY_PASSES:
        assert name in msg


def test_unknown_option_lists_the_pass_options():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("fold-constants{max_grow=4.0}")
    msg = str(info.value)
    assert "fold-constants" in msg and "max_grow" in msg
    assert "max_growth" in msg and "always_fold_numel" in msg


def test_option_on_a_pass_without_options():
    with pytest.raises(PipelineError, match=r"'dce' has no option 'keep'.*none"):
        parse_pipeline("dce{keep=1}")


@pytest.mark.parametrize("text, option", [
    ("fold-constants{max_growth=abc}", "max_growth"),
    ("fold-constants{max_growth=}", "max_growth"),
    ("fold-constants{always_fold_numel=1.5}", "always_fold_numel"),
])
def test_bad_option_value(text, option):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert option in str(info.value) and "fold-constants" in str(info.value)


@pytest.mark.parametrize("text, value", [
    ("test-option-kinds{flag=maybe}", "maybe"),
    ("test-option-kinds{mode=slow}", "slow"),
])
def test_bad_bool_and_literal_values(kinds_pass, text, value):
    with pytest.raises(PipelineError, match=value):
        parse_pipeline(text)


@pytest.mark.parametrize("text", [
    "dce{",
    "dce}",
    "fold-constants{max_growth=4.0",
    "fold-constants{max_growth=4.0}}",
    "cse,dce{a=b",
    "a{b}",
    "fold-constants{max_growth}",
    "dce{a=1}{b=2}",
    "dce{{a=1}}",
    "dce cse",
    "fold.bn",
])
def test_malformed_text(text):
    with pytest.raises(PipelineError):
        parse_pipeline(text)


def test_missing_equals_message_names_the_option():
    with pytest.raises(PipelineError, match=r"'b'.*key=value"):
        parse_pipeline("a{b}")


def test_pipeline_errors_are_orca_errors():
    with pytest.raises(orca_compiler.OrcaError):
        parse_pipeline("nope")


# -- the registry ----------------------------------------------------------------------------


def test_library_passes_are_registered_with_summaries():
    passes = orca_compiler.registered_passes()
    for name in LIBRARY_PASSES:
        assert name in passes
        cls = passes[name]
        assert cls.name == name
        summary = cls.summary()
        assert summary and summary.strip() == summary and "\n" not in summary
    assert list(passes) == sorted(passes)


@pytest.mark.parametrize("bad_name", ["FoldBN", "fold_bn", "fold--bn", "-dce", "dce-", "1dce", "", "fold bn"])
def test_register_rejects_non_kebab_names(bad_name):
    cls = type("BadName", (Pass,), {"name": bad_name, "__doc__": "bad.", "run": lambda self, ir, ctx: PassResult(ir, False)})
    try:
        with pytest.raises(ValueError, match="kebab"):
            register_pass(cls)
        assert bad_name not in orca_compiler.registered_passes()
    finally:
        unregister_pass(bad_name)


def test_register_rejects_non_dataclass_options():
    class NotADataclass:
        pass

    cls = type("BadOptions", (Pass,), {"name": "test-bad-options", "Options": NotADataclass})
    try:
        with pytest.raises(ValueError, match="dataclass"):
            register_pass(cls)
        assert "test-bad-options" not in orca_compiler.registered_passes()
    finally:
        unregister_pass("test-bad-options")


def test_register_rejects_a_second_class_with_a_taken_name():
    impostor = type("Impostor", (Pass,), {"name": "dce"})
    original = get_pass_class("dce")
    with pytest.raises(ValueError, match="already registered"):
        register_pass(impostor)
    assert get_pass_class("dce") is original


def test_registered_pass_is_usable_in_pipelines_until_unregistered(kinds_pass):
    assert "test-option-kinds" in orca_compiler.registered_passes()
    assert format_pipeline(parse_pipeline("cse,test-option-kinds")) == "cse,test-option-kinds"
    unregister_pass("test-option-kinds")
    assert "test-option-kinds" not in orca_compiler.registered_passes()
    with pytest.raises(PipelineError, match="test-option-kinds"):
        parse_pipeline("test-option-kinds")
