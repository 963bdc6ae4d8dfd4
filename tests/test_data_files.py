"""Tests of the file loaders (Omniglot PNG folders, LEAF FEMNIST JSON) on small files made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedmaml.data import DataSpec, build_federation, clear_cache, load_pool
from fedmaml.errors import DataError


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAML_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


# ------------------------------------------------------------------------------------- omniglot


def write_omniglot(root, alphabets=2, characters=3, images=4, size=105, seed=0):
    """A tiny Omniglot-layout folder: white background, one dark square per image."""
    rng = np.random.default_rng(seed)
    for a in range(alphabets):
        for c in range(characters):
            folder = root / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for i in range(images):
                pixels = np.full((size, size), 255, dtype=np.uint8)
                r, k = rng.integers(0, size - 30, 2)
                pixels[r : r + 30, k : k + 30] = 0
                Image.fromarray(pixels, mode="L").save(folder / f"{a}{c}_{i:02d}.png")
    return root


def omniglot_spec(root, **kw):
    return DataSpec(**{"family": "omniglot", "path": str(root), "num_clients": 2, "unseen_clients": 1,
                       "partition": "iid", "heldout_fraction": 0.25, **kw})


def test_omniglot_loads_classes_shapes_and_range(tmp_path):
    root = write_omniglot(tmp_path / "images_background")
    pool = load_pool(omniglot_spec(root))
    assert pool.x.shape == (24, 1, 28, 28) and pool.x.dtype == torch.float32
    assert pool.num_classes == 6 and pool.y.tolist() == np.repeat(np.arange(6), 4).tolist()
    assert 0.0 <= pool.x.min() and pool.x.max() <= 1.0
    assert pool.x.mean() < 0.5  # inverted: background 0, strokes 1
    fed = build_federation(omniglot_spec(root), 0)
    assert (fed.input_shape, fed.num_outputs, fed.task_type) == ((1, 28, 28), 6, "classification")
    assert sum(t.num_examples + len(t.heldout_x) for c in range(2) for t in fed.client_tasks(c)) == 16


def test_omniglot_n_way_tasks_are_characters_and_unseen_characters_are_new(tmp_path):
    root = write_omniglot(tmp_path / "omni", alphabets=3, characters=3)
    spec = omniglot_spec(root, partition="classes", classes_per_client=3, n_way=3)
    fed = build_federation(spec, 0)
    assert fed.num_outputs == 3
    pool = load_pool(spec)
    characters = []
    for task in [fed.client_tasks(0)[0], fed.client_tasks(1)[0], fed.unseen_tasks(0)[0]]:
        assert set(task.train_y.tolist()) == {0, 1, 2}
        rows = torch.cat([task.train_x, task.heldout_x]).reshape(-1, 28 * 28)
        match = (rows[:, None, :] == pool.x.reshape(1, -1, 28 * 28)).all(-1).nonzero()[:, 1]
        characters.append(set(pool.y[match].tolist()))
    assert all(len(c) == 3 for c in characters)
    assert len(set().union(*characters)) == 9  # 3 clients x 3 characters, none shared


def test_omniglot_disk_cache_is_reused_and_invalidated_by_file_changes(tmp_path):
    root = write_omniglot(tmp_path / "omni", alphabets=1, characters=2, images=2)
    first = load_pool(omniglot_spec(root))
    assert len(list((tmp_path / "cache").glob("omniglot-*.npz"))) == 1
    clear_cache()
    assert torch.equal(load_pool(omniglot_spec(root)).x, first.x)
    extra = root / "Alphabet_0" / "character01" / "extra.png"
    Image.fromarray(np.zeros((105, 105), np.uint8), mode="L").save(extra)
    assert load_pool(omniglot_spec(root)).x.shape[0] == 5


def test_omniglot_missing_directory(tmp_path):
    with pytest.raises(DataError) as info:
        build_federation(omniglot_spec(tmp_path / "nope"), 0)
    assert "nope" in str(info.value) and "<alphabet>/<character>" in str(info.value)


def test_omniglot_no_alphabets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no alphabet folders"):
        build_federation(omniglot_spec(tmp_path / "empty"), 0)


def test_omniglot_empty_alphabet_names_it(tmp_path):
    root = write_omniglot(tmp_path / "omni")
    (root / "Alphabet_9").mkdir()
    with pytest.raises(DataError) as info:
        build_federation(omniglot_spec(root), 0)
    assert "Alphabet_9" in str(info.value) and "empty alphabet" in str(info.value)


def test_omniglot_character_without_images_names_it_and_hints_at_the_level(tmp_path):
    root = write_omniglot(tmp_path / "omni")
    (root / "Alphabet_0" / "character99").mkdir()
    with pytest.raises(DataError) as info:
        build_federation(omniglot_spec(root), 0)
    assert "character99" in str(info.value) and "no .png images" in str(info.value)
    # pointing at the parent of images_background/ is a common slip: say so
    parent = tmp_path / "omniglot"
    write_omniglot(parent / "images_background")
    with pytest.raises(DataError, match="one level too high"):
        build_federation(omniglot_spec(parent), 0)


def test_omniglot_corrupt_png_names_the_file(tmp_path):
    root = write_omniglot(tmp_path / "omni")
    bad = root / "Alphabet_1" / "character02" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DataError) as info:
        build_federation(omniglot_spec(root), 0)
    assert str(bad) in str(info.value) and "unreadable image" in str(info.value)


# -------------------------------------------------------------------------------------- femnist


def write_femnist(root, writers_per_file=(3, 3), samples=6, seed=0):
    """LEAF-format files; writer w's pixels all equal (w + 1) / 100, so rows reveal their writer."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w = 0
    for f, count in enumerate(writers_per_file):
        users, data = [], {}
        for _ in range(count):
            name = f"f{w:04d}_{w % 7:02d}"
            users.append(name)
            data[name] = {
                "x": [[(w + 1) / 100] * 784 for _ in range(samples)],
                "y": rng.integers(0, 62, samples).tolist(),
            }
            w += 1
        content = {"users": users, "num_samples": [samples] * count, "user_data": data}
        (root / f"all_data_{f}.json").write_text(json.dumps(content))
    return root


def femnist_spec(root, **kw):
    return DataSpec(**{"family": "femnist", "path": str(root), "partition": "natural",
                       "num_clients": 4, "unseen_clients": 2, **kw})


def test_femnist_natural_partition_is_one_writer_per_client(tmp_path):
    root = write_femnist(tmp_path / "femnist")
    fed = build_federation(femnist_spec(root), 0)
    assert (fed.input_shape, fed.num_outputs) == ((1, 28, 28), 62)
    writers = []
    for task in [t for c in range(4) for t in fed.client_tasks(c)] + fed.unseen_tasks(0) + fed.unseen_tasks(1):
        assert task.train_x.shape[1:] == (1, 28, 28) and task.train_y.dtype == torch.int64
        values = torch.cat([task.train_x, task.heldout_x]).unique()
        assert len(values) == 1  # all examples of one writer
        assert task.num_examples + len(task.heldout_x) == 6
        writers.append(round(values.item() * 100))
    assert sorted(writers) == [1, 2, 3, 4, 5, 6]  # six distinct writers, unseen ones included


def test_femnist_merges_a_writer_across_files_and_supports_other_partitions(tmp_path):
    root = write_femnist(tmp_path / "femnist", writers_per_file=(2,))
    content = json.loads((root / "all_data_0.json").read_text())
    (root / "test_0.json").write_text(json.dumps(content))  # same writers again (LEAF train/test)
    pool = load_pool(femnist_spec(root))
    assert pool.x.shape == (24, 1, 28, 28) and [len(g) for g in pool.groups] == [12, 12]
    clear_cache()  # read back from the disk cache: same arrays and writer names
    again = load_pool(femnist_spec(root))
    assert torch.equal(again.x, pool.x) and again.group_names == pool.group_names == ("f0000_00", "f0001_01")
    fed = build_federation(femnist_spec(root, partition="iid", num_clients=3, unseen_clients=1), 0)
    assert fed.num_clients == 3


def test_femnist_too_few_writers(tmp_path):
    root = write_femnist(tmp_path / "femnist")
    with pytest.raises(DataError, match="only 6 of 6"):
        build_federation(femnist_spec(root, num_clients=6, unseen_clients=1), 0)


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD_USER = {"x": [[0.5] * 784] * 3, "y": [1, 2, 3]}


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"users": ["a"], "user_da', ["not a readable JSON file"]),
        ({"users": ["a"], "num_samples": [3]}, ["missing key 'user_data'"]),
        ({"user_data": {"a": GOOD_USER}}, ["missing key 'users'"]),
        ({"users": ["a", "b"], "user_data": {"a": GOOD_USER}}, ["user 'b'", "missing from 'user_data'"]),
        ({"users": ["a"], "user_data": {"a": {"x": [[0.5] * 784]}}}, ["user 'a'", "'x' and 'y'"]),
        ({"users": ["w7"], "user_data": {"w7": {"x": [[0.5] * 784, [0.5] * 783], "y": [1, 2]}}},
         ["user 'w7'", "x[1] has 783 values", "784"]),
        ({"users": ["a"], "user_data": {"a": {"x": [[0.5] * 784], "y": [62]}}}, ["user 'a'", "0..61"]),
        ({"users": ["a"], "num_samples": [5], "user_data": {"a": GOOD_USER}}, ["num_samples = 5", "3 examples"]),
        # JSON readers accept NaN and Infinity: the first bad record is named
        ('{"users": ["a"], "user_data": {"a": {"x": [' + ",".join(
            ["[" + ",".join(["0.5"] * 784) + "]"] * 2 + ["[NaN" + ",0.5" * 783 + "]",
                                                         "[Infinity" + ",0.5" * 783 + "]"])
         + '], "y": [1, 2, 3, 4]}}}', ["user 'a'", "x[2] holds NaN or infinite values (2 such"]),
    ],
)
def test_femnist_malformed_files_name_file_and_user(tmp_path, content, words):
    root = tmp_path / "femnist"
    bad = _write(root / "bad.json", content)
    with pytest.raises(DataError) as info:
        build_federation(femnist_spec(root, num_clients=1, unseen_clients=0), 0)
    message = str(info.value)
    assert str(bad) in message
    for word in words:
        assert word in message


def test_femnist_missing_or_empty_directory(tmp_path):
    with pytest.raises(DataError, match="FEMNIST directory not found"):
        build_federation(femnist_spec(tmp_path / "nope"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.json files"):
        build_federation(femnist_spec(tmp_path / "empty"), 0)
