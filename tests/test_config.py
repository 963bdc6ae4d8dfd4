"""The config schema: loading, overrides, validation messages, round trips and the generated docs."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from fedmaml.cli import DOC_MARKER
from fedmaml.config import (
    Config,
    config_from_dict,
    config_from_flat,
    config_reference_markdown,
    config_to_dict,
    config_to_flat,
    cross_field_problems,
    dump_yaml,
    load_config,
    parse_override,
    replace_path,
    replace_paths,
    resolve_key,
    schema,
    sections,
    short_key,
)
from fedmaml.errors import ConfigError, FedmamlError

ROOT = Path(__file__).resolve().parents[1]


def _error(d: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(d)
    return str(info.value)


# -- the schema itself ---------------------------------------------------------------------------

def test_every_field_has_type_default_and_help():
    for cls in [Config, *(c for _, c, _ in sections())]:
        assert dataclasses.fields(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    for spec in schema():
        assert "\n" not in spec.help
        default = spec.default if spec.is_list else (spec.default,)
        assert spec.choices is None or set(default) <= set(spec.choices), spec.path


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert config_from_dict({}) == cfg
    assert load_config(None) == cfg
    assert cross_field_problems(cfg) == []
    assert cfg.model.hidden == (40, 40) and cfg.algorithm.name == "moml"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    hash(cfg)  # immutable all the way down, usable as a dict key


def test_config_error_is_a_fedmaml_error():
    assert issubclass(ConfigError, FedmamlError)


# -- loading files ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("name", ["quickstart", "sinewave_centralized"])
def test_shipped_config_says_what_it_runs(name):
    path = ROOT / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("# "), "a config starts with a comment saying what it runs"
    assert load_config(path).name == name


def test_shipped_configs_match_the_brief():
    q = load_config(ROOT / "configs" / "quickstart.yaml")
    assert (q.data.family, q.data.num_clients, q.data.unseen_clients) == ("sinusoid", 200, 20)
    assert (q.federated.mode, q.federated.fraction, q.federated.rounds) == ("cross_device", 0.05, 300)
    s = load_config(ROOT / "configs" / "sinewave_centralized.yaml")
    assert s.data.family == "sinusoid_grid" and s.data.num_clients == 25
    assert s.federated.clients_per_round == 3 and s.federated.aggregation == "uniform"
    assert (s.algorithm.support_size, s.algorithm.init_support_size) == (1, 2)
    assert (s.algorithm.alpha, s.algorithm.eta, s.algorithm.beta) == (0.01, 0.005, 0.3)


def test_load_file_with_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nalgorithm:\n  beta: 0.5\n")
    cfg = load_config(f, ["algorithm.beta=0.7", "model.hidden=[20, 30]", "algorithm.eta=1e-3",
                          "evaluation.from_memory=false", "federated.round_timeout=5"])
    assert cfg.name == "x"
    assert cfg.algorithm.beta == 0.7
    assert cfg.model.hidden == (20, 30)
    assert cfg.algorithm.eta == 1e-3
    assert cfg.evaluation.from_memory is False
    assert cfg.federated.round_timeout == 5.0 and isinstance(cfg.federated.round_timeout, float)


def test_an_empty_file_is_an_error_and_an_empty_section_means_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    for text in ("", "# nothing yet\n"):
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"{f}: the config file is empty \(or holds only "
                                              r"comments\); write at least one key, e.g. 'name: "):
            load_config(f)
    f.write_text("data:\n")
    assert load_config(f) == Config()


def test_an_empty_hidden_list_is_an_error_unless_the_model_is_linear(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hidden: \[\] leaves the MLP without a hidden "
                                          r"layer; give at least one width, e.g. \[40, 40\], or "
                                          r"set model.name: linear"):
        load_config(None, ["model.hidden=[]"])
    cfg = load_config(None, ["model.name=linear", "data.num_clients=4"])
    from fedmaml.federated.setup import setup_for

    model = setup_for(cfg).model
    assert len(model.group_names) == 1 and [tuple(v.shape) for v in
                                            setup_for(cfg).initial_params.values()] == [(1, 1), (1,)]


@pytest.mark.parametrize("text, message", [
    ("011", "evaluation.pattern: expected a string, got 9 (YAML read 011 as the number 9; quote "
            "it: '011')"),
    ("0001", "evaluation.pattern: expected a string, got 1 (YAML read 0001 as the number 1; quote "
             "it: '0001')"),
    ("111", "evaluation.pattern: expected a string, got 111 (YAML read it as a number; quote it: "
            "'111')"),
])
def test_a_pattern_that_yaml_reads_as_a_number_says_how_to_quote_it(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(f"evaluation:\n  pattern: {text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {message}"
    f.write_text("federated:\n  rounds: 010\n")  # an integer key takes it as the number it is
    assert load_config(f).federated.rounds == 8 and type(load_config(f).federated.rounds) is int


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config("nope.yaml")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nalgorithm: [beta: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 3, column 1: invalid YAML: expected ',' or ']'") as info:
        load_config(f)
    assert "Traceback" not in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping.*list"):
        load_config(f)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("algorithm:\n  beta: 0.5\n  beta: 0.7\n")
    with pytest.raises(ConfigError, match="dup.yaml, line 3, column 3: invalid YAML: duplicate key 'beta'"):
        load_config(f)


def test_validation_error_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  beta: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: algorithm.beta: 2.0 is out of range"):
        load_config(f)


# -- overrides ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("algorithm.beta=0.5", ("algorithm.beta", 0.5)),
    ("model.hidden=[40,40]", ("model.hidden", [40, 40])),
    ("evaluation.from_memory=true", ("evaluation.from_memory", True)),
    ("algorithm.eta=1e-3", ("algorithm.eta", "1e-3")),  # YAML 1.1 reads it as text; float fields accept it
    ("name=my run", ("name", "my run")),
    ("name=2024", ("name", "2024")),  # string keys keep the text as written
    ("evaluation.pattern=0001", ("evaluation.pattern", "0001")),
    ("data.path=", ("data.path", "")),
    (" seed = 3 ", ("seed", 3)),
    ("algorithm.inner_pattern=1111|0001x4", ("algorithm.inner_pattern", "1111|0001x4")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("bad", ["algorithm.beta", "=0.5", ""])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(None, [bad])


def test_later_override_wins_and_creates_sections():
    cfg = load_config(None, ["seed=1", "seed=2", "engine.device=auto"])
    assert cfg.seed == 2 and cfg.engine.device == "auto"


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="seed: is a value"):
        load_config(None, ["seed=1", "seed.x=2"])


# -- one entry of a free-form mapping key ----------------------------------------------------------

OWN = "algorithm.name=my_algos:Mine"  # an import path: the config does not import it


@pytest.mark.parametrize("written", ["{lam: 0.1, mu: 2}", '\'{"lam": 0.1, "mu": 2}\''])
def test_an_override_sets_one_entry_of_a_mapping_key(tmp_path, written):
    """`algorithm.kwargs.lam=0.3` changes lam and keeps the other entries, whether the file holds
    the mapping as YAML or as the JSON text a run's config.yaml keeps."""
    f = tmp_path / "c.yaml"
    f.write_text(f"algorithm:\n  name: my_algos:Mine\n  kwargs: {written}\n")
    cfg = load_config(f, ["algorithm.kwargs.lam=0.3", "algorithm.kwargs.nu=[1, 2]"])
    assert json.loads(cfg.algorithm.kwargs) == {"lam": 0.3, "mu": 2, "nu": [1, 2]}
    assert load_config(None, [OWN, "algorithm.kwargs.lam=0.5"]).algorithm.kwargs == '{"lam": 0.5}'
    groups = load_config(None, ["model.name=my_models:net", "model.groups.body=[conv]",
                                "model.groups.head=fc", "model.kwargs.width=8"]).model
    assert json.loads(groups.groups) == {"body": ["conv"], "head": "fc"}
    assert json.loads(groups.kwargs) == {"width": 8}


def test_an_exponent_in_a_mapping_entry_stays_a_number(tmp_path):
    """An entry has no type to convert text back to a number: `1e-5` (text to YAML 1.1) and the
    `1e-05` that json.dumps writes must still come back as floats, from an override, a grid value
    (replace_paths), a file and a run's written config."""
    from fedmaml.user_objects import parse_mapping

    def lam(cfg):
        return parse_mapping("algorithm.kwargs", cfg.algorithm.kwargs)["lam"]

    assert lam(load_config(None, [OWN, "algorithm.kwargs.lam=1e-5"])) == 1e-5
    assert lam(load_config(None, [OWN, "algorithm.kwargs.lam=0.00001"])) == 1e-5
    tags = load_config(None, [OWN, "algorithm.kwargs.tag=e5", "algorithm.kwargs.lam=-1E3"])
    assert parse_mapping("algorithm.kwargs", tags.algorithm.kwargs) == {"tag": "e5", "lam": -1e3}
    swept = replace_paths(load_config(None, [OWN]), {"algorithm.kwargs.lam": 0.00001})
    assert lam(swept) == 1e-5 and lam(replace_path(swept, "algorithm.kwargs.mu", 2)) == 1e-5
    f = tmp_path / "c.yaml"
    f.write_text("algorithm:\n  name: my_algos:Mine\n  kwargs: {lam: 2e-3, big: 1E20}\n")
    cfg = load_config(f)
    assert json.loads(cfg.algorithm.kwargs) == {"lam": 2e-3, "big": 1e20}
    written = tmp_path / "config.yaml"
    written.write_text(dump_yaml(swept))  # as a run writes its config.yaml
    assert lam(load_config(written)) == 1e-5
    assert load_config(None, ["algorithm.eta=1e-3"]).algorithm.eta == 1e-3  # typed keys as before


def test_replace_path_and_resolve_key_take_a_mapping_entry():
    cfg = load_config(None, [OWN, "algorithm.kwargs={lam: 0.1, mu: 2}"])
    assert json.loads(replace_path(cfg, "algorithm.kwargs.lam", 0.7).algorithm.kwargs) == {
        "lam": 0.7, "mu": 2}
    assert resolve_key("algorithm.kwargs.lam", [0.1]) == "algorithm.kwargs.lam"
    assert short_key("algorithm.kwargs.lam") == "algorithm.kwargs.lam"  # kwargs alone: 2 keys
    assert short_key("model.groups.head") == "model.groups.head"


@pytest.mark.parametrize("overrides, message", [
    (["algoritm.kwargs.lam=0.5"], r"algoritm: unknown key; did you mean 'algorithm'\?"),
    ([OWN, "algorithm.kwargs=[1, 2]", "algorithm.kwargs.lam=0.1"],
     r"algorithm.kwargs: is \[1, 2\], not a mapping, so 'algorithm.kwargs.lam' cannot be set"),
    ([OWN, "algorithm.kwargs.day=2024-01-31"],
     r"algorithm.kwargs.day: YAML read 2024-01-31 as a date.*quote it: '2024-01-31'"),
    (["algorithm.kwargs.lam=0.1"], r"algorithm.kwargs: only for your own algorithm"),
])
def test_a_bad_mapping_entry_names_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("key, message", [
    ("algorithm.bta", r"algorithm.bta: unknown key; did you mean 'algorithm.beta'\?"),
    ("algorithm.kwarg.lam", r"algorithm.kwarg.lam: unknown key; did you mean 'algorithm.kwargs'"),
    # an entry is written with its mapping's full key: a suffix such as kwargs could be two
    ("kwargs.lam", r"kwargs.lam: unknown key; an entry of a mapping is set with the mapping's "
                   r"full key: model.kwargs.lam or algorithm.kwargs.lam"),
])
def test_a_key_that_names_no_key_nor_mapping_entry_is_unknown(key, message):
    with pytest.raises(ConfigError, match=message):
        resolve_key(key, [0.1])


# -- validation rules ------------------------------------------------------------------------------

def test_unknown_key_suggests_near_miss():
    msg = _error({"algorithm": {"bta": 0.5}})
    assert "algorithm.bta: unknown key; did you mean 'beta'?" in msg


def test_unknown_section_suggests_near_miss():
    assert "algorithim: unknown key; did you mean 'algorithm'?" in _error({"algorithim": {}})


def test_unknown_key_without_near_miss_lists_allowed_keys():
    msg = _error({"model": {"zzz": 1}})
    assert ("model.zzz: unknown key; allowed keys: conv_strided, conv_width, groups, hidden, "
            "init_seed, kwargs, loss, name") in msg


@pytest.mark.parametrize("d, expected", [
    ({"seed": "3"}, "seed: expected an integer, got '3'"),
    ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
    ({"seed": True}, "seed: expected an integer, got true"),  # bool is never an int
    ({"data": {"num_clients": False}}, "data.num_clients: expected an integer, got false"),
    ({"algorithm": {"beta": "high"}}, "algorithm.beta: expected a finite number, got 'high'"),
    ({"algorithm": {"beta": True}}, "algorithm.beta: expected a finite number, got true"),
    ({"algorithm": {"eta": float("nan")}}, "algorithm.eta: expected a finite number, got nan"),
    ({"model": {"conv_strided": 1}}, "model.conv_strided: expected true or false, got 1"),
    ({"name": None}, "name: expected a string, got null"),
    ({"evaluation": {"pattern": 1}}, "evaluation.pattern: expected a string, got 1 (YAML read it as a number; quote it: '1')"),
    ({"model": {"hidden": 4.5}}, "model.hidden: expected a list of integers such as 40,40 or "
                                 "[40, 40], got 4.5"),
    ({"model": {"hidden": [40, 4.5]}}, "model.hidden[1]: expected an integer, got 4.5"),
    ({"model": {"hidden": [40, True]}}, "model.hidden[1]: expected an integer, got true"),
    ({"data": 3}, "data: section 'data' must be a mapping of keys, got 3"),
])
def test_wrong_type(d, expected):
    assert expected in _error(d)


def test_int_accepted_where_float_expected():
    cfg = config_from_dict({"algorithm": {"beta": 1}, "federated": {"server_lr": 2}})
    assert cfg.algorithm.beta == 1.0 and isinstance(cfg.algorithm.beta, float)
    assert isinstance(cfg.federated.server_lr, float)


def test_tuple_and_list_both_accepted():
    assert config_from_dict({"model": {"hidden": (8,)}}).model.hidden == (8,)
    assert config_from_dict({"model": {"name": "linear", "hidden": []}}).model.hidden == ()


@pytest.mark.parametrize("d, expected", [
    ({"seed": -1}, "seed: -1 is out of range; allowed: >= 0"),
    ({"algorithm": {"beta": 0}}, "algorithm.beta: 0.0 is out of range; allowed: (0, 1]"),
    ({"algorithm": {"beta": 1.01}}, "algorithm.beta: 1.01 is out of range; allowed: (0, 1]"),
    ({"algorithm": {"alpha": 0}}, "algorithm.alpha: 0.0 is out of range; allowed: > 0"),
    ({"data": {"heldout_fraction": 1}}, "data.heldout_fraction: 1.0 is out of range; allowed: (0, 1)"),
    ({"federated": {"server_momentum": 1.0}}, "allowed: [0, 1)"),
    ({"data": {"mnist1d_samples": 99}}, "data.mnist1d_samples: 99 is out of range; allowed: >= 100"),
    ({"model": {"hidden": [40, 0]}}, "model.hidden[1]: 0 is out of range; allowed: >= 1"),
])
def test_out_of_range(d, expected):
    assert expected in _error(d)


def test_range_bounds_are_inclusive_where_documented():
    cfg = config_from_dict({"algorithm": {"beta": 1}, "federated": {"server_momentum": 0,
                                                                    "lr_decay_at": 0}})
    assert cfg.algorithm.beta == 1.0


def test_bad_choice_lists_choices_and_suggests():
    msg = _error({"data": {"family": "sinusiod"}})
    assert "data.family: 'sinusiod' is not allowed; allowed: sinusoid, sinusoid_grid" in msg
    assert "did you mean 'sinusoid'?" in msg


def test_all_field_problems_reported_together():
    msg = _error({"seed": -1, "algorithm": {"bta": 1, "beta": 5}, "engine": {"device": "tpu"}})
    assert msg.startswith("config: 4 problems:")
    for part in ("seed:", "algorithm.bta:", "algorithm.beta:", "engine.device:"):
        assert f"  - {part}" in msg


@pytest.mark.parametrize("d, expected", [
    ({"algorithm": {"memory_policy": "decay_to_w"}},
     "algorithm.memory_policy: 'decay_to_w' requires federated.mode 'cross_silo'"),
    ({"algorithm": {"name": "per_fedavg", "meta_gradient": "second_order"}},
     "algorithm.meta_gradient: 'second_order' is not available for algorithm 'per_fedavg'; "
     "allowed: first_order, hessian_free"),
    ({"algorithm": {"name": "fedmeta", "meta_gradient": "hessian_free"}},
     "allowed: first_order, second_order"),
    ({"federated": {"clients_per_round": 3, "min_replies": 4}},
     "federated.min_replies: 4 exceeds federated.clients_per_round (3)"),
    ({"data": {"num_clients": 5}, "federated": {"min_replies": 6}},
     "federated.min_replies: 6 exceeds data.num_clients (5)"),
    ({"data": {"num_clients": 5}, "federated": {"clients_per_round": 6}},
     "federated.clients_per_round: 6 exceeds data.num_clients (5)"),
    ({"model": {"name": "conv4"}}, "model.name: 'conv4' needs an image family"),
])
def test_cross_field_rules(d, expected):
    assert expected in _error(d)


def test_cross_field_rules_accept_valid_combinations():
    config_from_dict({"algorithm": {"memory_policy": "decay_to_w"}, "federated": {"mode": "cross_silo"}})
    config_from_dict({"algorithm": {"name": "per_fedavg", "meta_gradient": "hessian_free"}})
    config_from_dict({"algorithm": {"name": "fedmeta", "meta_gradient": "second_order"}})
    config_from_dict({"algorithm": {"name": "moml", "meta_gradient": "second_order"}})
    config_from_dict({"federated": {"clients_per_round": 3, "min_replies": 3}})
    config_from_dict({"model": {"name": "conv4"}, "data": {"family": "omniglot"}})


# -- round trips and paths -----------------------------------------------------------------------

def _custom() -> Config:
    return load_config(None, ["name=exp", "seed=7", "model.hidden=[8,16]", "algorithm.beta=0.7",
                              "evaluation.pattern=0001x5", "federated.mode=cross_silo",
                              "algorithm.memory_policy=decay_to_w", "data.path=/tmp/data"])


def test_dict_round_trip():
    cfg = _custom()
    d = config_to_dict(cfg)
    assert d["model"]["hidden"] == [8, 16]  # plain lists, not tuples
    assert config_from_dict(d) == cfg
    assert config_to_dict(Config())["algorithm"]["beta"] == 0.3


def test_yaml_round_trip(tmp_path):
    cfg = _custom()
    text = dump_yaml(cfg)
    assert "hidden: [8, 16]" in text
    assert "pattern: 0001x5" in text or "pattern: '0001x5'" in text
    f = tmp_path / "dumped.yaml"
    f.write_text(text)
    assert load_config(f) == cfg
    assert yaml.safe_load(dump_yaml(Config())) == config_to_dict(Config())


def test_flat_round_trip():
    cfg = _custom()
    flat = config_to_flat(cfg)
    assert flat["algorithm.beta"] == 0.7
    assert flat["model.hidden"] == "8,16"
    assert {type(v) for v in flat.values()} <= {bool, int, float, str}  # Flower run-config scalars
    assert set(flat) == {s.path for s in schema()}
    assert config_from_flat(flat) == cfg


def test_flat_partial_and_list_forms():
    cfg = config_from_flat({"algorithm.beta": 0.5, "model.hidden": "[20, 20]", "seed": 3})
    assert cfg.algorithm.beta == 0.5 and cfg.model.hidden == (20, 20) and cfg.seed == 3
    assert config_from_flat({"model.name": "linear", "model.hidden": ""}).model.hidden == ()
    assert config_from_flat({"model.hidden": [4]}).model.hidden == (4,)


def test_flat_errors_name_the_key():
    with pytest.raises(ConfigError, match="run config: algorithm.bta: unknown key; did you mean 'beta'"):
        config_from_flat({"algorithm.bta": 0.5})
    with pytest.raises(ConfigError, match=r"model.hidden\[1\]: expected an integer, got 'x'"):
        config_from_flat({"model.hidden": "4,x"})


def test_replace_path():
    cfg = Config()
    new = replace_path(cfg, "algorithm.beta", 0.7)
    assert new.algorithm.beta == 0.7 and cfg.algorithm.beta == 0.3
    assert replace_path(cfg, "seed", 5).seed == 5
    with pytest.raises(ConfigError, match=r"algorithm.beta: 1.5 is out of range"):
        replace_path(cfg, "algorithm.beta", 1.5)
    with pytest.raises(ConfigError, match="algorithm.bta: unknown key; did you mean 'algorithm.beta'"):
        replace_path(cfg, "algorithm.bta", 0.5)


def test_replace_paths_changes_linked_keys_together():
    new = replace_paths(Config(), {"algorithm.name": "per_fedavg",
                                   "algorithm.meta_gradient": "hessian_free"})
    assert (new.algorithm.name, new.algorithm.meta_gradient) == ("per_fedavg", "hessian_free")


# -- reference docs ----------------------------------------------------------------------------------

def test_reference_lists_every_key():
    md = config_reference_markdown()
    for spec in schema():
        assert f"| `{spec.path}` |" in md
    for name, _, _ in sections():
        assert f"## `{name}`" in md
    assert "| `algorithm.beta` | float | `0.3` | (0, 1] |" in md
    assert "| `model.hidden` | list[int] | `[40, 40]` | each >= 1 |" in md


def test_committed_docs_match_the_schema():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert DOC_MARKER in text, "docs/configuration.md lost its generated-section marker"
    generated = text.split(DOC_MARKER, 1)[1].lstrip("\n")
    assert generated == config_reference_markdown(), (
        "docs/configuration.md is out of date: run "
        "`python -m fedmaml config reference --update docs/configuration.md`")


# -- lists of strings (tracking.backends) -----------------------------------------------------------

def test_string_list_keys_parse_validate_and_round_trip():
    cfg = load_config(None, ["tracking.backends=[tensorboard, mlflow]"])
    assert cfg.tracking.backends == ("tensorboard", "mlflow")
    assert config_to_flat(cfg)["tracking.backends"] == "tensorboard,mlflow"  # Flower run config
    assert config_from_flat(config_to_flat(cfg)) == cfg
    assert config_from_flat({"tracking.backends": ""}).tracking.backends == ()
    assert load_config(None, ["tracking.backends=[]"]) == Config()
    for override, message in [
            ("[tensorbord]", "tracking.backends[0]: 'tensorbord' is not allowed; allowed: "
                             "tensorboard, mlflow, wandb; did you mean 'tensorboard'?"),
            ("true", "tracking.backends[0]: 'true' is not allowed; allowed: tensorboard, "
                     "mlflow, wandb"),  # on the command line a list item is text as written
            ("tensorboard,mlfow", "tracking.backends[1]: 'mlfow' is not allowed; allowed: "
                                  "tensorboard, mlflow, wandb; did you mean 'mlflow'?"),
            ("[mlflow, mlflow]", "tracking.backends[1]: 'mlflow' appears twice"),
            ("[1]", "tracking.backends[0]: '1' is not allowed")]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"tracking.backends={override}"])
        assert message in str(info.value)
    with pytest.raises(ConfigError, match=r"tracking.backends: expected a list such as "
                                          r"tensorboard,mlflow or \[tensorboard, mlflow\], got true"):
        config_from_dict({"tracking": {"backends": True}})  # in a file: YAML's true is no list


@pytest.mark.parametrize("written", ["{},{}", "[{},{}]", "[{}, {}]"])
def test_one_list_syntax_on_the_command_line_as_in_flowers_run_config(written):
    """``a,b`` (as in `flwr run --run-config` and --grid) and ``[a,b]`` (YAML) both set a list key;
    a single item is a list of one; an empty value the empty list."""
    ints, names = written.format(20, 30), written.format("tensorboard", "mlflow")
    cfg = load_config(None, [f"model.hidden={ints}", f"tracking.backends={names}"])
    assert cfg.model.hidden == (20, 30) and cfg.tracking.backends == ("tensorboard", "mlflow")
    assert cfg == config_from_flat({"model.hidden": ints, "tracking.backends": names})
    one = load_config(None, ["model.hidden=16", "tracking.backends=mlflow"])
    assert one.model.hidden == (16,) and one.tracking.backends == ("mlflow",)
    assert load_config(None, ["tracking.backends="]).tracking.backends == ()


@pytest.mark.parametrize("override, message", [
    ("model.hidden=40,abc", "model.hidden[1]: expected an integer, got 'abc'"),
    ("model.hidden=[40,abc]", "model.hidden[1]: expected an integer, got 'abc'"),
    ("model.hidden=40,0", "model.hidden[1]: 0 is out of range; allowed: >= 1"),
    ("model.hidden=true", "model.hidden: expected a list of integers such as 40,40 or [40, 40], "
                          "got true"),
])
def test_a_bad_list_value_names_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def public_code_reference(method: dict) -> str:
    """The quickstart's reference text for one method of docs/results/public_code_sinewave.json."""
    at = {budget: m["test_mse"] for budget, m in method.items()}
    text = (f"{at['5000']['mean']:.3f} ± {at['5000']['std']:.3f} at 5,000 steps "
            f"({at['5000']['seeds']} seeds)")
    if "40000" in at:
        text += (f", {at['40000']['mean']:.3f} ± {at['40000']['std']:.3f} at 40,000 "
                 f"({at['40000']['seeds']} seeds)")
    return text + ": the paper's public code"


def test_the_quickstart_sweep_is_the_papers_setting_in_miniature_in_three_batches(tmp_path):
    """Each named setting of the quickstart is exactly the reference experiment's run of that
    method under the public code's protocol and step sizes (simulations/reproduce_moml_sinewave.py)
    at 5,000 steps, and its reference is what the paper's public code itself gave for that method
    and budget (docs/results/public_code_sinewave.json, docs/results.md)."""
    import json
    import sys

    from fedmaml.run_dir import config_differences
    from fedmaml.sweep import load_sweep, plan_batches, plan_sweep

    sys.path.insert(0, str(ROOT / "simulations"))
    try:
        import reproduce_moml_sinewave as reference
    finally:
        sys.path.remove(str(ROOT / "simulations"))
    path = ROOT / "configs" / "sweeps" / "moml_miniature.yaml"
    assert path.read_text().startswith("# ")
    base, spec = load_sweep(path)
    assert list(spec.settings) == ["MOML", "LocalMOML", "FO-MAML"] and not spec.grid
    assert spec.seeds == (0, 1, 2)
    assert list(spec.references) == list(spec.settings)
    public = json.loads((ROOT / "docs" / "results" / "public_code_sinewave.json")
                        .read_text(encoding="utf-8"))
    assert public["source"]["commit"].startswith("5c30c0d")
    by_method = {name: {b: public["budgets"][b][name] for b in public["budgets"]
                        if name in public["budgets"][b]} for name in spec.settings}
    for name, ref in spec.references.items():
        assert ref.text == public_code_reference(by_method[name]), name
        # a value of the metric compare shows it beside (the same test tasks, points and
        # adaptation), at the rounds of the public code's budgets
        assert ref.metric == "unseen.loss.mean", name
        assert ref.rounds == tuple(m["schedule"].get("rounds_of_H_5_steps",
                                                     m["schedule"]["iterations"])
                                   for m in by_method[name].values()), name
        five = by_method[name]["5000"]
        assert sorted(map(int, five["test_mse_per_seed"])) == list(spec.seeds), name
        eta, beta = reference.BY_NAME[name].public[1]  # the same step sizes as the settings
        assert five["step_sizes"]["eta"] == eta, name
        assert five["step_sizes"].get("beta") == (beta if reference.BY_NAME[name].uses_beta
                                                  else None), name
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert "docs/results/public_code_sinewave.json" in results
    for name, method in by_method.items():  # the table of docs/results.md shows the same numbers
        five = method["5000"]["test_mse"]
        assert f"| {name} | {five['mean']:.3f} ± {five['std']:.3f} (" in results, name
    runs, _ = plan_sweep(base, spec, tmp_path)
    for run in runs:
        method = reference.BY_NAME[run.setting]
        eta, beta = method.public[1]
        expected = reference.make_config(method, 1, eta, beta, run.seed, 5000, tmp_path, 10,
                                         "public")
        # eval_every only sets how often the curve is sampled; fedmeta has no memory to initialise
        ignore = ("output_dir", "name", "federated.eval_every",
                  *(["algorithm.init_support_size"] if method.name == "FO-MAML" else []))
        assert config_differences(expected, run.config, ignore=ignore) == [], run.name
        schedule = by_method[run.setting]["5000"]["schedule"]  # the public code's 5,000-step run
        assert run.config.federated.rounds == schedule.get("rounds_of_H_5_steps",
                                                           schedule["iterations"]), run.name
        if "H" in by_method[run.setting]["5000"]["step_sizes"]:  # LocalMOML's K0 and H
            sizes = by_method[run.setting]["5000"]["step_sizes"]
            assert (sizes["K0"], sizes["H"]) == (run.config.algorithm.init_support_size,
                                                 run.config.algorithm.local_steps)
    batches, alone, _ = plan_batches(runs, tmp_path, jobs=2)
    assert not alone and sorted(len(b) for b in batches) == [3, 3, 3]  # one per method


# -- one list syntax for every list key (issue 22.5) -----------------------------------------------

LIST_KEYS = {  # key: (the text, the list it means)
    "compare_with": ("fedavg,per_fedavg", ("fedavg", "per_fedavg")),
    "pattern_selection.candidates": ("0001x5, 11111", ("0001x5", "11111")),
    "pattern_selection.apply_to": ("inner,evaluation", ("inner", "evaluation")),
    "tracking.backends": ("tensorboard", ("tensorboard",)),
}


@pytest.mark.parametrize("key", sorted(LIST_KEYS))
def test_string_list_keys_take_every_list_spelling(key, tmp_path):
    text, items = LIST_KEYS[key]
    section, _, leaf = key.rpartition(".")
    bracketed = "[" + ",".join(items) + "]"
    for value in (text, bracketed, f"[{', '.join(items)}]"):  # the command line
        assert _get(load_config(None, [f"{key}={value}"]), key) == items, value
    for value in (list(items), text, bracketed):  # a YAML list, or a string, in a file
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump({section: {leaf: value}} if section else {leaf: value}))
        assert _get(load_config(f), key) == items, value
    cfg = load_config(None, [f"{key}={text}"])  # Flower's run config: a comma string, and back
    assert config_to_flat(cfg)[key] == ",".join(items)
    assert _get(config_from_flat(config_to_flat(cfg)), key) == items
    assert _get(load_config(None, [f"{key}="]), key) == ()  # empty: the empty list


def test_every_list_key_is_a_tuple_and_every_string_list_is_checked_above():
    """A list-valued key is a tuple in the schema, its default and a loaded config (never a comma
    string to split later), and a new string-list key cannot skip the spelling test above."""
    lists = [s for s in schema() if s.is_list]
    assert {s.path for s in lists if s.item_type is str} == set(LIST_KEYS)
    loaded = load_config(None, [f"{k}={text}" for k, (text, _) in LIST_KEYS.items()]
                         + ["pattern_selection.full_steps=1,2", "model.hidden=8"])
    for spec in lists:
        assert typing.get_origin(spec.type) is tuple, spec.path
        assert isinstance(spec.default, tuple), spec.path
        assert isinstance(_get(Config(), spec.path), tuple), spec.path
        assert isinstance(_get(loaded, spec.path), tuple) and _get(loaded, spec.path), spec.path


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_patterns_in_a_list_stay_text_as_written(tmp_path):
    """0001 is a pattern, not the number 1, whichever way the list is written."""
    f = tmp_path / "c.yaml"
    f.write_text("pattern_selection:\n  candidates: [0001, 011, 11111]\n")
    assert load_config(f).pattern_selection.candidates == ("0001", "011", "11111")
    for value in ("[0001,011]", "0001,011", "0001"):
        got = load_config(None, [f"pattern_selection.candidates={value}"]).pattern_selection
        assert got.candidates == tuple(value.strip("[]").split(","))


def test_bad_items_of_a_string_list_are_named():
    with pytest.raises(ConfigError, match=r"compare_with\[1\]: 'fedavgg' is not allowed; allowed: "
                                          r"moml, .*did you mean 'fedavg'"):
        load_config(None, ["compare_with=[per_fedavg, fedavgg]"])
    with pytest.raises(ConfigError, match=r"pattern_selection.apply_to\[1\]: 'inner' appears twice"):
        load_config(None, ["pattern_selection.apply_to=inner,inner"])
