"""Tests of fedmaml.data: generated families, pools, partitions, task plans and the entry point."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmaml.data import DataSpec, PoolTask, SinusoidTask, build_federation, clear_cache, load_pool
from fedmaml.data.counter import Stream, round_keys
from fedmaml.data.fewshot import plan_client_tasks, round_robin, stratified_split
from fedmaml.data.partition import (
    class_partition,
    dirichlet_partition,
    iid_partition,
    natural_partition,
)
from fedmaml.data.sinusoid import grid_parameters
from fedmaml.errors import ConfigError, DataError

MNIST1D_SAMPLES = 600  # small: generated in ~0.2 s


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test starts with empty in-process caches and a private on-disk cache directory."""
    monkeypatch.setenv("FEDMAML_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedmaml-cache"))
    clear_cache()
    yield
    clear_cache()


def all_tasks(fed, unseen=False):
    if unseen:
        return [t for j in range(fed.num_unseen) for t in fed.unseen_tasks(j)]
    return [t for c in range(fed.num_clients) for t in fed.client_tasks(c)]


def row_keys(x: torch.Tensor) -> set[bytes]:
    """Rows as bytes, to test disjointness of example sets (pools used here have no duplicates)."""
    flat = x.reshape(len(x), -1).numpy()
    return {row.tobytes() for row in flat}


def assert_tasks_equal(a, b):
    assert len(a) == len(b)
    for ta, tb in zip(a, b):
        for ea, eb in zip(ta.evaluation_split(), tb.evaluation_split()):
            assert torch.equal(ea, eb)
        if isinstance(ta, PoolTask):
            assert torch.equal(ta.train_x, tb.train_x) and torch.equal(ta.train_y, tb.train_y)


# --------------------------------------------------------------------------------------- the spec


def test_spec_reads_any_config_object_with_defaults():
    section = SimpleNamespace(family="digits", num_clients=7, partition="dirichlet", dirichlet_alpha=0.3)
    spec = DataSpec.from_config(section)
    assert (spec.family, spec.num_clients, spec.partition, spec.dirichlet_alpha) == ("digits", 7, "dirichlet", 0.3)
    assert spec.heldout_fraction == DataSpec().heldout_fraction
    assert DataSpec.from_config({"family": "synthetic", "unseen_clients": 0}).unseen_clients == 0
    assert DataSpec.from_config(spec) is spec
    assert DataSpec(family="femnist", path=pathlib.Path("leaf") / "data").path == str(pathlib.Path("leaf/data"))


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"family": "cifar"}, ["data.family", "'cifar'", "sinusoid_grid"]),
        ({"num_clients": 0}, ["data.num_clients", "0", ">= 1"]),
        ({"num_clients": True}, ["data.num_clients"]),
        ({"heldout_fraction": 1.0}, ["data.heldout_fraction", "(0, 1)"]),
        ({"dirichlet_alpha": -1}, ["data.dirichlet_alpha", "> 0"]),
        ({"partition": "shards"}, ["data.partition", "'shards'", "dirichlet"]),
        ({"family": "digits", "partition": "natural"}, ["'natural'", "femnist", "'digits'"]),
        ({"family": "sinusoid", "n_way": 5}, ["data.n_way", "'sinusoid'"]),
        ({"family": "sinusoid_grid", "num_clients": 26}, ["data.num_clients", "26", "25"]),
        ({"family": "sinusoid_grid", "num_clients": 13, "tasks_per_client": 2}, ["26", "25"]),
        ({"eval_adapt_size": 0}, ["data.eval_adapt_size", ">= 1"]),
        ({"family": "omniglot", "path": ""}, ["data.path", "omniglot"]),
        ({"eval_points": "fixed"}, ["data.eval_points", "'fixed'", "separate", "shared"]),
        ({"family": "digits", "eval_points": "shared"}, ["data.eval_points", "'digits'", "separate"]),
        ({"eval_points": "shared", "eval_adapt_size": 20, "eval_heldout_size": 10},
         ["data.eval_adapt_size", "20", "data.eval_heldout_size", "10"]),
    ],
)
def test_spec_rejects_bad_values_naming_key_value_and_allowed(fields, words):
    with pytest.raises(DataError) as info:
        DataSpec(**fields)
    for word in words:
        assert word in str(info.value)


def test_spec_fields_and_defaults_match_the_config_data_section():
    config = pytest.importorskip("fedmaml.config")
    ours = {f.name: f.default for f in dataclasses.fields(DataSpec)}
    theirs = {f.name: f.default for f in dataclasses.fields(config.DataConfig)}
    assert ours == theirs
    assert DataSpec.from_config(config.DataConfig()) == DataSpec()


def test_build_federation_validates_seed():
    with pytest.raises(ConfigError, match="seed"):
        build_federation(DataSpec(), -1)


def test_federations_are_cached_by_relevant_fields_and_seed():
    base = build_federation(DataSpec(family="sinusoid"), 0)
    assert build_federation(DataSpec(family="sinusoid"), 0) is base
    # dirichlet_alpha does not matter to sinusoids: same federation
    assert build_federation(DataSpec(family="sinusoid", dirichlet_alpha=9.0), 0) is base
    assert build_federation(DataSpec(family="sinusoid", num_clients=3), 0) is not base
    assert build_federation(DataSpec(family="sinusoid"), 1) is not base
    digits = build_federation(DataSpec(family="digits", partition="iid"), 0)
    assert build_federation(DataSpec(family="digits", partition="iid", classes_per_client=4), 0) is digits
    assert build_federation(DataSpec(family="digits", partition="classes", classes_per_client=4), 0) is not digits


# --------------------------------------------------------------------------------------- sinusoid


def test_sinusoid_shapes_ranges_and_fresh_draws():
    fed = build_federation(DataSpec(family="sinusoid", num_clients=50, unseen_clients=3), 0)
    assert (fed.input_shape, fed.num_outputs, fed.task_type) == ((1,), 1, "regression")
    tasks = all_tasks(fed)
    assert len(tasks) == 50
    for task in tasks:
        assert isinstance(task, SinusoidTask)
        assert 0.1 <= task.amplitude <= 5.0 and 0.0 <= task.phase <= math.pi
        assert task.num_examples == SinusoidTask.NOMINAL_NUM_EXAMPLES
    task = tasks[0]
    x1, y1 = task.draw(Stream(round_keys(0, [0], 1)), 7)
    x2, _ = task.draw(Stream(round_keys(0, [0], 2)), 7)
    assert x1.shape == y1.shape == (7, 1) and x1.dtype == y1.dtype == torch.float32
    assert not torch.equal(x1, x2)  # fresh points each draw
    assert x1.min() >= -5 and x1.max() <= 5
    assert torch.allclose(y1, task.amplitude * torch.sin(x1 + task.phase))


def test_sinusoid_evaluation_split_is_fixed_and_sized():
    spec = DataSpec(family="sinusoid", eval_adapt_size=4, eval_heldout_size=30)
    task = build_federation(spec, 0).client_tasks(3)[0]
    ax, ay, hx, hy = task.evaluation_split()
    assert ax.shape == ay.shape == (4, 1) and hx.shape == hy.shape == (30, 1)
    clear_cache()
    again = build_federation(spec, 0).client_tasks(3)[0]
    assert_tasks_equal([task], [again])
    assert not torch.equal(ax, build_federation(spec, 0).client_tasks(4)[0].evaluation_split()[0])


@pytest.mark.parametrize("family", ["sinusoid", "sinusoid_grid"])
def test_shared_evaluation_points_are_the_public_codes(family):
    """``eval_points: shared``: every task adapts on the first 10 of the same 100 points and is
    measured on all 100, the points of ``np.random.seed(2021); np.random.uniform(-5, 5, n)``."""
    spec = DataSpec(family=family, num_clients=2, unseen_clients=2, eval_points="shared")
    fed = build_federation(spec, 7)
    tasks = fed.client_tasks(0) + fed.client_tasks(1) + fed.unseen_tasks(0) + fed.unseen_tasks(1)
    np.random.seed(2021)  # the public code's two draws, each after re-seeding
    plot = np.random.uniform(-5, 5, 100)
    np.random.seed(2021)
    adapt = np.random.uniform(-5, 5, 10)
    for task in tasks:
        ax, ay, hx, hy = task.evaluation_split()
        assert hx.shape == hy.shape == (100, 1) and ax.shape == ay.shape == (10, 1)
        np.testing.assert_array_equal(hx[:, 0].numpy(), plot.astype(np.float32))
        np.testing.assert_array_equal(ax[:, 0].numpy(), adapt.astype(np.float32))
        torch.testing.assert_close(hy, task.target(hx))
        torch.testing.assert_close(ay, hy[:10])
    # the tasks differ in their targets only
    assert not torch.equal(tasks[0].evaluation_split()[3], tasks[2].evaluation_split()[3])


def test_sinusoid_is_deterministic_per_seed_and_unseen_tasks_differ():
    spec = DataSpec(family="sinusoid", num_clients=5, unseen_clients=5, tasks_per_client=2)
    a = build_federation(spec, 7)
    clear_cache()
    b = build_federation(spec, 7)
    assert a is not b
    assert_tasks_equal(all_tasks(a), all_tasks(b))
    params = lambda tasks: {(t.amplitude, t.phase) for t in tasks}  # noqa: E731
    assert len(params(all_tasks(a))) == 10  # two distinct tasks per silo
    assert params(all_tasks(a)).isdisjoint(params(all_tasks(build_federation(spec, 8))))
    assert params(all_tasks(a)).isdisjoint(params(all_tasks(a, unseen=True)))


def allocated_while(build):
    """``build()``'s result and the peak memory (bytes) Python and numpy allocated meanwhile: a
    measure of work that, unlike wall time, does not depend on how loaded the machine is."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = build()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_million_client_sinusoid_federation_is_lazy():
    fed, peak = allocated_while(lambda: build_federation(
        DataSpec(family="sinusoid", num_clients=1_000_000, unseen_clients=1_000_000), 0))
    # a million clients built up front would take far more than a byte each
    assert peak < 1_000_000, f"building allocated {peak} bytes: clients must be created on demand"
    (task,) = fed.client_tasks(999_999)
    assert 0.1 <= task.amplitude <= 5.0
    assert fed.unseen_tasks(999_999)[0].amplitude != task.amplitude
    with pytest.raises(IndexError):
        fed.client_tasks(1_000_000)


def test_lazy_federation_pickles_and_rebuilds_the_same_clients():
    fed = build_federation(DataSpec(family="sinusoid", num_clients=1_000_000), 0)
    clone = pickle.loads(pickle.dumps(fed))
    assert_tasks_equal(clone.client_tasks(123_456), fed.client_tasks(123_456))


def test_recently_used_clients_tasks_are_kept_and_the_cache_is_bounded(monkeypatch):
    import fedmaml.data.tasks as T

    monkeypatch.setattr(T, "CLIENT_TASK_CACHE", 2)
    fed = build_federation(DataSpec(family="digits", num_clients=5), 0)
    first = fed.client_tasks(1)
    kept = fed.client_tasks(1)
    assert kept is not first and all(a is b for a, b in zip(kept, first))  # not sliced again
    kept.append(None)  # a caller's list is its own
    assert len(fed.client_tasks(1)) == len(first)
    fed.client_tasks(2), fed.client_tasks(3)  # client 1 is now the least recently used: dropped
    again = fed.client_tasks(1)
    assert again[0] is not first[0]
    assert_tasks_equal(again, first)
    assert len(fed._client_tasks.results) == 2
    # the byte budget bounds it too: with room for less than one client's tensors, nothing stays
    monkeypatch.setattr(T, "CLIENT_TASK_CACHE_MB", 1e-6)
    fed.client_tasks(4)
    assert not fed._client_tasks.results and fed._client_tasks.nbytes == 0
    clone = pickle.loads(pickle.dumps(fed))  # the kept tasks do not travel
    assert not clone._client_tasks.results
    assert_tasks_equal(clone.client_tasks(1), first)


def test_sinusoid_grid_has_exactly_the_25_grid_tasks_in_public_code_order():
    fed = build_federation(DataSpec(family="sinusoid_grid", num_clients=25), 0)
    params = [(t.amplitude, round(t.phase, 12)) for t in all_tasks(fed)]
    grid = [(float(a), round(k * math.pi / 5, 12)) for a in range(1, 6) for k in range(1, 6)]
    assert params == grid
    assert grid_parameters(0) == (1.0, math.pi / 5)
    # the same 25 tasks, five per silo
    silo = build_federation(DataSpec(family="sinusoid_grid", num_clients=5, tasks_per_client=5), 0)
    assert [(t.amplitude, round(t.phase, 12)) for t in all_tasks(silo)] == grid
    with pytest.raises(DataError, match="25"):
        build_federation(DataSpec.from_config({"family": "sinusoid_grid", "num_clients": 26}), 0)


def test_sinusoid_grid_test_tasks_are_the_public_codes_and_seed_independent():
    spec = DataSpec(family="sinusoid_grid", num_clients=25, unseen_clients=5)
    fed = build_federation(spec, 0)
    assert fed.num_unseen == 5
    for q in range(5):
        (task,) = fed.unseen_tasks(q)
        legacy = np.random.RandomState(q)  # public code: sample_amp_pha(1, 5, pi/5, pi, seed=q)
        assert task.amplitude == pytest.approx(legacy.uniform(1, 5))
        assert task.phase == pytest.approx(legacy.uniform(math.pi / 5, math.pi))
        ax, ay, hx, hy = task.evaluation_split()
        assert ax.shape == (10, 1) and hx.shape == (100, 1)
    other_seed = build_federation(spec, 3)
    assert_tasks_equal(all_tasks(fed, unseen=True), all_tasks(other_seed, unseen=True))


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_sizes_and_determinism():
    spec = DataSpec(family="synthetic", num_clients=20, unseen_clients=2, heldout_fraction=0.25)
    fed = build_federation(spec, 0)
    assert (fed.input_shape, fed.num_outputs, fed.task_type) == ((60,), 10, "classification")
    for task in all_tasks(fed):
        n = task.num_examples + len(task.heldout_x)
        assert 50 <= n <= 500
        assert len(task.heldout_x) == round(0.25 * n)
        assert task.train_x.shape == (task.num_examples, 60) and task.train_x.dtype == torch.float32
        assert task.train_y.dtype == torch.int64 and task.train_y.shape == (task.num_examples,)
        assert 0 <= task.train_y.min() and task.train_y.max() < 10
        assert row_keys(task.train_x).isdisjoint(row_keys(task.heldout_x))
    clear_cache()
    assert_tasks_equal(all_tasks(fed), all_tasks(build_federation(spec, 0)))
    assert not torch.equal(fed.client_tasks(0)[0].train_x[:5], build_federation(spec, 1).client_tasks(0)[0].train_x[:5])


def test_synthetic_million_clients_are_lazy():
    fed, peak = allocated_while(lambda: build_federation(DataSpec(family="synthetic",
                                                                  num_clients=1_000_000), 0))
    assert peak < 1_000_000, f"building allocated {peak} bytes: clients must be created on demand"
    assert fed.client_tasks(999_999)[0].train_x.shape[1] == 60


def test_pool_task_draws_without_replacement_when_possible():
    task = build_federation(DataSpec(family="synthetic", num_clients=1), 0).client_tasks(0)[0]
    g = Stream(round_keys(0, [0], 1))
    x, y = task.draw(g, task.num_examples)
    assert len(row_keys(x)) == task.num_examples  # every training example exactly once
    assert row_keys(x) == row_keys(task.train_x)
    x, y = task.draw(g, task.num_examples + 5)  # more than the pool: with replacement, same shape
    assert x.shape == (task.num_examples + 5, 60) and y.shape == (task.num_examples + 5,)


# ----------------------------------------------------------------------------------------- pools


def test_digits_shapes_and_range():
    fed = build_federation(DataSpec(family="digits", num_clients=10, unseen_clients=2), 0)
    assert (fed.input_shape, fed.num_outputs, fed.task_type) == ((1, 8, 8), 10, "classification")
    tasks = all_tasks(fed) + all_tasks(fed, unseen=True)
    assert sum(t.num_examples + len(t.heldout_x) for t in tasks) == 1797
    for t in tasks:
        assert t.train_x.dtype == torch.float32 and t.train_y.dtype == torch.int64
        assert 0.0 <= t.train_x.min() and t.train_x.max() <= 1.0


def test_mnist1d_shapes_disk_cache_and_global_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAML_CACHE_DIR", str(tmp_path))
    random.seed(123)
    np.random.seed(123)
    spec = DataSpec(family="mnist1d", mnist1d_samples=MNIST1D_SAMPLES, num_clients=4, unseen_clients=1)
    fed = build_federation(spec, 0)
    assert random.random() == random.Random(123).random()
    assert np.random.random() == np.random.RandomState(123).random_sample()
    assert (fed.input_shape, fed.num_outputs) == ((40,), 10)
    task = fed.client_tasks(0)[0]
    assert task.train_x.shape[1:] == (40,) and task.train_x.dtype == torch.float32
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))
    pool = load_pool(spec)
    assert pool.x.shape == (MNIST1D_SAMPLES, 40)
    clear_cache()  # next build reads the disk cache
    assert_tasks_equal(all_tasks(fed), all_tasks(build_federation(spec, 0)))


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "classes"])
def test_pool_partitions_are_disjoint_across_clients_and_splits(partition):
    spec = DataSpec(
        family="mnist1d", mnist1d_samples=MNIST1D_SAMPLES, num_clients=8, unseen_clients=2,
        partition=partition, dirichlet_alpha=0.5, classes_per_client=3, tasks_per_client=2,
    )
    fed = build_federation(spec, 0)
    seen: set[bytes] = set()
    total = 0
    for task in all_tasks(fed) + all_tasks(fed, unseen=True):
        train, held = row_keys(task.train_x), row_keys(task.heldout_x)
        assert len(held) >= 1 and train.isdisjoint(held)
        assert seen.isdisjoint(train | held)
        seen |= train | held
        total += len(train) + len(held)
    assert total == len(seen)
    if partition != "classes":  # classes may leave classes unused; the others use every example
        assert total == MNIST1D_SAMPLES


def test_pool_federation_is_deterministic_per_seed():
    spec = DataSpec(family="digits", partition="dirichlet", num_clients=6, unseen_clients=2)
    a = all_tasks(build_federation(spec, 5))
    clear_cache()
    assert_tasks_equal(a, all_tasks(build_federation(spec, 5)))
    b = all_tasks(build_federation(spec, 6))
    assert row_keys(a[0].train_x) != row_keys(b[0].train_x)


def test_n_way_tasks_are_relabelled_to_0_n_minus_1():
    spec = DataSpec(family="digits", partition="classes", classes_per_client=6, n_way=3,
                    tasks_per_client=2, num_clients=5, unseen_clients=2, eval_adapt_size=6)
    fed = build_federation(spec, 0)
    assert fed.num_outputs == 3
    for task in all_tasks(fed) + all_tasks(fed, unseen=True):
        assert set(task.train_y.tolist()) == {0, 1, 2}
        assert set(task.heldout_y.tolist()) <= {0, 1, 2}
        adapt_y = task.evaluation_split()[1]
        assert sorted(adapt_y.tolist()) == [0, 0, 1, 1, 2, 2]  # the adapt prefix is class-balanced
    # iid clients hold all 10 digits: n_way=5 tasks pick 5 of them
    iid = build_federation(DataSpec(family="digits", partition="iid", n_way=5, num_clients=4), 0)
    assert all(set(t.train_y.tolist()) == set(range(5)) for t in all_tasks(iid))


def test_n_way_larger_than_a_clients_classes_is_a_clear_error():
    spec = DataSpec(family="digits", partition="classes", classes_per_client=2, n_way=3)
    with pytest.raises(DataError) as info:
        build_federation(spec, 0)
    assert "client 0" in str(info.value) and "n_way = 3" in str(info.value)


def test_classes_per_client_beyond_the_classes_is_a_clear_error():
    with pytest.raises(DataError) as info:
        build_federation(DataSpec(family="digits", partition="classes", classes_per_client=11), 0)
    assert "data.classes_per_client = 11" in str(info.value) and "only 10 classes" in str(info.value)


def test_too_many_clients_for_the_pool_is_a_clear_error():
    with pytest.raises(DataError) as info:
        build_federation(DataSpec(family="digits", partition="iid", num_clients=1000), 0)
    message = str(info.value)
    assert "'iid'" in message and "1797" in message and "1000" in message


def test_dirichlet_skew_at_federation_level():
    def mean_classes(alpha):
        spec = DataSpec(family="digits", partition="dirichlet", dirichlet_alpha=alpha, num_clients=20)
        return np.mean([len(set(t.train_y.tolist()) | set(t.heldout_y.tolist())) for t in all_tasks(build_federation(spec, 0))])

    assert mean_classes(0.05) < 5 < mean_classes(100.0)


# ------------------------------------------------------------------------------------ partitions


def test_iid_partition_covers_everything_once():
    parts = iid_partition(103, 10, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(p) for p in parts} == {10, 11}
    with pytest.raises(DataError, match="103 examples"):
        iid_partition(103, 60, np.random.default_rng(0), min_size=2)


def _labels(num_classes=10, per_class=60, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    labels = _labels()

    def mean_classes(alpha):
        counts = []
        for seed in range(3):
            parts = dirichlet_partition(labels, 20, alpha, np.random.default_rng(seed))
            counts += [len(np.unique(labels[p])) for p in parts]
        return np.mean(counts)

    skewed, uniform = mean_classes(0.1), mean_classes(100.0)
    assert skewed < 5 and uniform > 9.5


def test_dirichlet_is_disjoint_and_tops_up_short_parts():
    labels = _labels(per_class=10)
    parts = dirichlet_partition(labels, 40, 0.01, np.random.default_rng(0), min_size=2)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == 100
    assert min(len(p) for p in parts) >= 2


def test_class_partition_gives_exactly_k_classes():
    labels = _labels()
    parts = class_partition(labels, 12, 3, np.random.default_rng(0))
    assert all(len(np.unique(labels[p])) == 3 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    # while num_parts * k <= classes, parts share no class (unseen clients get new classes)
    disjoint = class_partition(_labels(num_classes=30, per_class=5), 10, 3, np.random.default_rng(1))
    classes = [set(_labels(num_classes=30, per_class=5)[p].tolist()) for p in disjoint]
    assert sum(len(c) for c in classes) == len(set().union(*classes)) == 30


def test_class_partition_errors():
    with pytest.raises(DataError, match="only 10 classes"):
        class_partition(_labels(), 3, 11, np.random.default_rng(0))
    with pytest.raises(DataError, match="class .* has 2 examples but 5 parts share it"):
        class_partition(_labels(num_classes=2, per_class=2), 5, 2, np.random.default_rng(0))


def test_natural_partition_skips_tiny_groups():
    groups = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 9)]
    parts, chosen = natural_partition(groups, 2, np.random.default_rng(0), min_size=2)
    assert sorted(chosen) == [0, 2]
    with pytest.raises(DataError, match="only 2 of 3"):
        natural_partition(groups, 3, np.random.default_rng(0), min_size=2)


# ---------------------------------------------------------------------------------- task planning


def test_stratified_split_sizes_and_proportions():
    labels = np.repeat([0, 1], [80, 20])
    train, held = stratified_split(labels, 0.25, np.random.default_rng(0))
    assert len(held) == 25 and len(train) == 75
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert np.bincount(labels[held]).tolist() == [20, 5]
    train, held = stratified_split(np.array([3, 3]), 0.01, np.random.default_rng(0))
    assert len(train) == len(held) == 1
    with pytest.raises(DataError, match="at least 2 examples"):
        stratified_split(np.array([1]), 0.5, np.random.default_rng(0))


def test_round_robin_orders_one_of_each_class_per_round():
    labels = np.repeat([0, 1, 2], [5, 3, 2])
    order = round_robin(np.arange(10), labels, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(10))
    assert sorted(labels[order[:3]].tolist()) == [0, 1, 2]
    assert sorted(labels[order[3:6]].tolist()) == [0, 1, 2]


def test_plan_client_tasks_splits_a_silo_into_disjoint_tasks():
    labels = _labels(num_classes=4, per_class=10)
    plans = plan_client_tasks(np.arange(40), labels, tasks=3, n_way=0, heldout_fraction=0.2,
                              rng=np.random.default_rng(0))
    used = np.concatenate([np.r_[p.train, p.heldout] for p in plans])
    assert len(plans) == 3 and sorted(used.tolist()) == list(range(40))
    with pytest.raises(DataError, match="holds 5 examples"):
        plan_client_tasks(np.arange(5), labels, tasks=3, n_way=0, heldout_fraction=0.2,
                          rng=np.random.default_rng(0))


def test_many_clients_tasks_equal_each_clients_own():
    """A family's batch builder (sinusoid) gives every client the tasks it gets alone; cached and
    new clients mix; ids outside the federation are refused."""
    spec = DataSpec(family="sinusoid", num_clients=1000, tasks_per_client=3)
    alone = build_federation(spec, 5)
    clear_cache()
    batched = build_federation(spec, 5)
    batched.client_tasks(7)  # one cached, the others built in one batch
    got = batched.clients_tasks([7, 999, 0, 7])
    for cid, tasks in zip([7, 999, 0, 7], got):
        want = alone._client_tasks.fn(cid)
        assert [(t.amplitude, t.phase, t.eval_seed) for t in tasks] == \
               [(t.amplitude, t.phase, t.eval_seed) for t in want]
    assert len({t.amplitude for ts in got[:3] for t in ts}) == 9
    with pytest.raises(IndexError, match="1000"):
        batched.clients_tasks([3, 1000])
