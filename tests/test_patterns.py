"""Lambda patterns (docs/algorithms.md#layer-groups-and-lambda-patterns): textual form,
canonicalisation, errors, aliases, queries."""

import random

import pytest

from fedmaml.core.patterns import Pattern, pattern_steps, resolve_pattern
from fedmaml.errors import FedmamlError, PatternError
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import small_conv, small_mlp

CONV_GROUPS = ("conv1", "conv2", "conv3", "conv4", "head")


# -- parse / str round trip -----------------------------------------------------------------------

@pytest.mark.parametrize("text, rows", [
    ("none", ()),
    ("1", ((1,),)),
    ("0", ((0,),)),
    ("11111", ((1, 1, 1, 1, 1),)),
    ("00001x5", ((0, 0, 0, 0, 1),) * 5),
    ("1111|0001x4", ((1, 1, 1, 1),) + ((0, 0, 0, 1),) * 4),
    ("0000|0011|0000", ((0, 0, 0, 0), (0, 0, 1, 1), (0, 0, 0, 0))),
    ("10x2|01x3|10", ((1, 0),) * 2 + ((0, 1),) * 3 + ((1, 0),)),
    ("0x12", ((0,),) * 12),
    ("101x10|010", ((1, 0, 1),) * 10 + ((0, 1, 0),)),
])
def test_parse_canonical_text(text, rows):
    p = Pattern.parse(text)
    assert p.rows == rows
    assert p.steps == len(rows)
    assert str(p) == text  # these are already canonical
    assert Pattern.parse(str(p)) == p


@pytest.mark.parametrize("text, canonical", [
    ("11|11", "11x2"),
    ("11x1", "11"),
    ("0001x2|0001x3", "0001x5"),
    ("0001|0001|1111|0001", "0001x2|1111|0001"),
    ("  1111 | 0001x2 ", "1111|0001x2"),
    ("01x1|01x1|10x1", "01x2|10"),
    (" none ", "none"),
])
def test_canonicalisation(text, canonical):
    p = Pattern.parse(text)
    assert str(p) == canonical
    assert Pattern.parse(canonical) == p
    assert hash(Pattern.parse(canonical)) == hash(p)


def test_random_round_trips():
    rng = random.Random(1234)
    for _ in range(300):
        width = rng.randint(1, 6)
        rows = []
        for _ in range(rng.randint(0, 5)):
            row = tuple(rng.randint(0, 1) for _ in range(width))
            rows.extend([row] * rng.randint(1, 4))
        p = Pattern(tuple(rows))
        text = str(p)
        q = Pattern.parse(text)
        assert q == p and q.rows == p.rows, (rows, text)
        assert str(q) == text
        # the canonical form never contains an explicit "x1" or two equal neighbouring segments
        segs = text.split("|")
        assert not any(s.endswith("x1") for s in segs)
        assert all(a.split("x")[0] != b.split("x")[0] for a, b in zip(segs, segs[1:]))


def test_constructors():
    assert Pattern.full(4, 2) == Pattern.parse("1111x2")
    assert Pattern.top(5, 1, 3) == Pattern.parse("00001x3")
    assert Pattern.top(5, 2, 1) == Pattern.parse("00011")
    assert Pattern.uniform([0, 1, 1], 2) == Pattern.parse("011x2")
    assert Pattern.full(3, 0) == Pattern.parse("none")
    assert Pattern.parse("none").num_groups is None
    assert Pattern.parse("0110x3").num_groups == 4


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_is_an_error(text):
    with pytest.raises(PatternError, match="empty"):
        Pattern.parse(text)


@pytest.mark.parametrize("text", [
    "0120", "11a1", "1111|0002", "0001x0", "0001x", "x3", "0001x-1", "0001x01", "11||11", "|11",
    "11|", "1 1", "11x2x2", "0b11", "1111,0001",
])
def test_malformed_is_an_error(text):
    with pytest.raises(PatternError) as info:
        Pattern.parse(text)
    assert isinstance(info.value, FedmamlError) and isinstance(info.value, ValueError)


def test_ragged_rows_are_an_error():
    with pytest.raises(PatternError, match="different lengths"):
        Pattern.parse("11|111")
    with pytest.raises(PatternError, match="different lengths"):
        Pattern.parse("1111x2|001")


def test_direct_construction_is_validated():
    with pytest.raises(PatternError, match="binary"):
        Pattern(((1, 2),))
    with pytest.raises(PatternError, match="at least one bit"):
        Pattern(((),))
    with pytest.raises(PatternError):
        Pattern(((1, 0), (1,)))


def test_construction_normalises_rows():
    """Rows given as lists or bools become tuples of ints: the pattern is hashable (StepConfig is
    hashed to group cohorts), prints as bits and equals its parsed form."""
    p = Pattern([[1, 0], [1, 0]])
    assert p == Pattern.parse("10x2") and hash(p) == hash(Pattern.parse("10x2"))
    q = Pattern(((True, False),))
    assert str(q) == "10" and q == Pattern.parse("10")
    assert Pattern.parse(str(q)) == q


@pytest.mark.parametrize("text", ["111", "111111", "1111|1111", "111111x2"])
def test_wrong_width_for_model_names_the_groups(text):
    model = small_conv()
    with pytest.raises(PatternError) as info:
        resolve_pattern(text, model.group_names, steps=3, model_name=model.name)
    msg = str(info.value)
    for g in CONV_GROUPS:
        assert g in msg, msg
    assert model.name in msg
    assert "5" in msg  # the number of groups the model has
    with pytest.raises(PatternError):
        Pattern.parse(text).validate(model.group_names, model.name)


@pytest.mark.parametrize("text", ["", "0120", "11111|1111", "00001x0", "11111||00001"])
def test_every_invalid_pattern_for_a_model_names_its_groups(text):
    """Invalid patterns (wrong length, empty, non-binary) get a clear error naming the model's
    groups (docs/algorithms.md#layer-groups-and-lambda-patterns) -- not only the wrong-width
    case."""
    model = small_conv()
    with pytest.raises(PatternError) as info:
        resolve_pattern(text, model.group_names, steps=3, model_name=model.name)
    msg = str(info.value)
    assert str(list(CONV_GROUPS)) in msg, msg


def test_unknown_word_mentions_aliases():
    with pytest.raises(PatternError) as info:
        resolve_pattern("anil", CONV_GROUPS, steps=1)
    assert "full" in str(info.value) and "head" in str(info.value) and "body" in str(info.value)


def test_body_needs_two_groups():
    with pytest.raises(PatternError, match="two layer groups"):
        resolve_pattern("body", ("only",), steps=1)


# -- aliases and resolution -----------------------------------------------------------------------

def test_aliases_resolve_for_models():
    conv, net = small_conv(), small_mlp()
    assert conv.group_names == CONV_GROUPS
    assert resolve_pattern("full", conv.group_names, 3) == Pattern.parse("11111x3")
    assert resolve_pattern("head", conv.group_names, 2) == Pattern.parse("00001x2")
    assert resolve_pattern("body", conv.group_names, 4) == Pattern.parse("11110x4")
    assert resolve_pattern(" head ", net.group_names, 1) == Pattern.parse("0001")
    assert resolve_pattern("body", net.group_names, 2) == Pattern.parse("1110x2")
    assert resolve_pattern("full", net.group_names, 0) == Pattern.parse("none")
    assert resolve_pattern("none", net.group_names, 5) == Pattern.parse("none")
    # explicit text ignores `steps`: the pattern says how many steps it has
    assert resolve_pattern("1111|0001x2", net.group_names, 7).steps == 3
    # a Pattern object passes through validation
    p = Pattern.parse("0011x2")
    assert resolve_pattern(p, net.group_names, 1) is p
    with pytest.raises(PatternError):
        resolve_pattern(p, conv.group_names, 1)


@pytest.mark.parametrize("text, steps, runs", [
    ("0001", 5, 1), ("0001x5", 1, 5), ("1111|0001x4", 10, 5), ("none", 3, 0),
    ("head", 5, 5), (" full ", 0, 0), ("body", 2, 2),
])
def test_a_written_out_pattern_has_its_own_step_count_an_alias_the_steps_key(text, steps, runs):
    assert pattern_steps(text, steps) == runs
    assert resolve_pattern(text, small_mlp().group_names, steps).steps == runs


# -- queries --------------------------------------------------------------------------------------

def test_adapted_and_lowest_adapted_from():
    p = Pattern.parse("00000|00101|01000|00001x2|00000")
    assert [p.adapted(s) for s in range(p.steps)] == [(), (2, 4), (1,), (4,), (4,), ()]
    assert [p.lowest_adapted_from(s) for s in range(p.steps)] == [1, 1, 1, 4, 4, None]
    assert Pattern.parse("11111").lowest_adapted_from(0) == 0
    assert Pattern.parse("none").steps == 0
    assert Pattern.parse("none").lowest_adapted_from(0) is None
    q = Pattern.parse("1111|0001x4")
    assert q.adapted(0) == (0, 1, 2, 3) and q.adapted(4) == (3,)
    assert [q.lowest_adapted_from(s) for s in range(5)] == [0, 3, 3, 3, 3]
    # lowest_adapted_from never decreases along the steps (the prefix cache only ever advances)
    rng = random.Random(7)
    for _ in range(100):
        rows = tuple(tuple(rng.randint(0, 1) for _ in range(5)) for _ in range(rng.randint(1, 6)))
        p = Pattern(rows)
        lows = [p.lowest_adapted_from(s) for s in range(p.steps)]
        lows = [5 if v is None else v for v in lows]
        assert lows == sorted(lows)
        for s in range(p.steps):
            assert all(lows[s] <= g for t in range(s, p.steps) for g in p.adapted(t))


def test_a_run_set_up_resolves_its_config_patterns_once(monkeypatch):
    """setup_for resolves the three patterns once (the hyperparameters and the evaluation share
    them); a bad one is still refused naming its key."""
    from fedmaml.config import load_config
    from fedmaml.federated import setup as setup_module

    calls = []

    def counted(cfg, groups):
        calls.append(cfg.name)
        return real(cfg, groups)

    real = setup_module.config_patterns
    monkeypatch.setattr(setup_module, "config_patterns", counted)
    cfg = load_config(None, ["name=once", "data.num_clients=4", "model.hidden=[4]",
                             "algorithm.inner_pattern=01", "evaluation.pattern=head"])
    setup = setup_module.setup_for(cfg)
    assert calls == ["once"]
    assert str(setup.hyper.step.inner_pattern) == "01" and str(setup.eval_pattern) == "01x10"
    bad = load_config(None, ["name=bad", "data.num_clients=4", "model.hidden=[4]",
                             "evaluation.pattern=111"])
    with pytest.raises(PatternError, match=r"^evaluation.pattern: pattern '111' has 3 bits per "
                                           r"row but .* has 2 layer groups"):
        setup_module.setup_for(bad)
