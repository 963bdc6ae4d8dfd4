"""``fedmaml.collector``: the garbage collector is paused and objects frozen only inside the blocks,
and always restored."""

from __future__ import annotations

import gc

from fedmaml import collector


def test_paused_restores_the_collector_on_every_exit():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # nested: the inner block must not switch it back on early
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with collector.paused():
            raise RuntimeError("a failing round")
    except RuntimeError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


def test_frozen_leaves_out_older_objects_and_restores_them():
    assert gc.get_freeze_count() == 0
    old = [[] for _ in range(10)]
    with collector.frozen():
        assert gc.get_freeze_count() >= len(old)  # the older objects are out of collections
        young = [[]]
        assert any(o is young for o in gc.get_objects()) and not any(o is old for o in gc.get_objects())
        with collector.frozen():  # nested: the outer block keeps ownership
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    assert any(o is old for o in gc.get_objects())  # collectable again


def test_frozen_leaves_an_application_freeze_alone():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with collector.frozen():
            pass
        assert gc.get_freeze_count() == count  # not unfrozen by us
    finally:
        gc.unfreeze()
