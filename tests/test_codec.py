"""The fast ArrayRecord codec writes exactly Flower's bytes and reads anything Flower writes."""

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmaml.errors import MessageError
from fedmaml.federated import codec

PARAMS = {"w": torch.randn(5, 3), "b": torch.randn(5), "scalar": torch.tensor(2.5),
          "big": torch.randn(2, 3, 4, 5), "ints": torch.arange(6).reshape(2, 3),
          "double": torch.randn(3, dtype=torch.float64)}


def test_encode_writes_flowers_bytes():
    ours, flowers = codec.encode(PARAMS), ArrayRecord(dict(PARAMS))
    assert list(ours) == list(flowers)
    for k in PARAMS:
        assert (ours[k].dtype, ours[k].shape, ours[k].stype) == \
               (flowers[k].dtype, flowers[k].shape, flowers[k].stype)
        assert ours[k].data == flowers[k].data, k
    # Flower reads it back
    back = ours.to_torch_state_dict()
    assert all(torch.equal(back[k], PARAMS[k]) for k in PARAMS)


@pytest.mark.parametrize("twice", [False, True])  # first read parses, the second uses the cache
def test_decode_reads_flowers_records(twice):
    record = ArrayRecord(dict(PARAMS))
    for _ in range(2 if twice else 1):
        out = codec.decode(record)
    assert list(out) == list(PARAMS)
    for k, v in PARAMS.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    out["w"] += 1  # decoded tensors own their memory: the message is unchanged
    assert torch.equal(codec.decode(record)["w"], PARAMS["w"])


def test_decode_falls_back_for_unusual_arrays():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    big_endian = np.arange(4, dtype=">f4")
    record = ArrayRecord({"f": Array(fortran), "be": Array(big_endian)})
    for _ in range(2):
        out = codec.decode(record)
        assert np.array_equal(out["f"].numpy(), fortran)
        assert np.array_equal(out["be"].numpy(), big_endian)


def test_encode_rows_equals_encoding_each_row():
    stacked = {k: torch.stack([v + i for i in range(3)]) for k, v in PARAMS.items()}
    rows = codec.encode_rows(stacked)
    assert len(rows) == 3
    for i, record in enumerate(rows):
        single = codec.encode({k: v[i] for k, v in stacked.items()})
        assert [(a.shape, a.data) for a in record.values()] == \
               [(a.shape, a.data) for a in single.values()]


def test_records_are_indistinguishable_from_flowers():
    ours, flowers = codec.encode(PARAMS), ArrayRecord(dict(PARAMS))
    assert ours == flowers
    assert ours.is_dirty and all(a.is_dirty for a in ours.values())  # as new Flower records
    assert ours.deflate() == flowers.deflate() and ours.object_id == flowers.object_id
    # with this Flower version the records are filled directly (the self-check at import passed)
    assert codec._array is codec._array_direct


def test_stack_from_records_equals_checking_each_record():
    from fedmaml.federated import records as R

    like = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    good = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(3)]
    double = {k: v.double() for k, v in good[2].items()}  # another dtype is cast, as from_record does
    nan = {"w": good[0]["w"], "b": torch.tensor([0.0, float("nan")])}
    wrong_shape = {"w": torch.randn(2, 3), "b": torch.randn(2)}
    renamed = {"W": good[0]["w"], "b": good[0]["b"]}
    huge = {"w": torch.full((3, 2), 3e38), "b": torch.randn(2)}  # finite, but its sum overflows
    # read the long way (float64), then a tensor of the wrong shape: nothing of it may be kept
    double_then_bad = {"w": good[1]["w"].double(), "b": torch.randn(3)}
    text = ArrayRecord({"w": Array(np.full((3, 2), "x")), "b": Array(np.zeros(2, np.float32))})
    garbage = ArrayRecord({"w": Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray",
                                      data=b"not an npy file"), "b": Array(np.zeros(2, np.float32))})
    records = [ArrayRecord(dict(p)) for p in (good[0], nan, good[1], wrong_shape, double, renamed,
                                              huge, double_then_bad)] + [text, garbage]
    whats = [f"client {j}" for j in range(len(records))]
    stacked, errors = R.stack_from_records(records, like, whats)
    for j, (record, what) in enumerate(zip(records, whats)):
        try:
            want = R.from_record(record, like, what)
        except MessageError as e:  # the same text
            assert errors[j] == str(e)
        except (TypeError, ValueError) as e:  # undecodable: the same text, naming the client
            assert errors[j] == f"{what}: {e}"
        else:
            assert errors[j] is None
            assert all(torch.equal(stacked[k][j], want[k]) for k in like)
            assert all(stacked[k].dtype == like[k].dtype for k in like)
        if errors[j] is not None:
            assert all(not v[j].any() for v in stacked.values())  # a rejected row is zero
    assert [e is None for e in errors] == [True, False, True, False, True, False, True, False,
                                           False, False]
    # a float64 record again: its layout is known now and read as a view of the message's bytes,
    # which must be copied, not handed to torch read-only (a warning, and a tensor on shared bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, errors = R.stack_from_records([records[4]], like, ["client 4"])
    assert errors == [None] and all(torch.equal(again[k][0], stacked[k][4]) for k in like)


def test_stack_from_records_rejects_values_that_overflow_the_models_dtype():
    from fedmaml.federated import records as R

    # finite in float64, infinite once cast to the model's float32: from_record checked before the
    # cast and let it through; the stack is checked after it
    like = {"w": torch.zeros(2)}
    record = ArrayRecord({"w": torch.tensor([1.0, 1e300], dtype=torch.float64)})
    _, errors = R.stack_from_records([record], like, ["client 0"])
    assert errors == ["client 0: parameter 'w' contains NaN or infinite values"]


def test_stack_from_records_of_nothing_and_of_empty_tensors():
    from fedmaml.federated import records as R

    like = {"w": torch.zeros(2, 3), "empty": torch.zeros(0)}
    stacked, errors = R.stack_from_records([], like, [])
    assert errors == [] and stacked["w"].shape == (0, 2, 3)
    one = {"w": torch.ones(2, 3), "empty": torch.zeros(0)}
    stacked, errors = R.stack_from_records([ArrayRecord(dict(one))] * 2, like, ["a", "b"])
    assert errors == [None, None] and stacked["empty"].shape == (2, 0)
    assert torch.equal(stacked["w"], torch.ones(2, 2, 3))
