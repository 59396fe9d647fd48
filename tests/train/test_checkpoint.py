"""Checkpointer: verified restore, fallback past damaged checkpoints, no non-finite saves, retention."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxformers.sharding import make_mesh
from train.checkpoint import Checkpointer, describe_mismatch, state_checksum


def make_state(mesh, value: float):
    w = np.arange(64 * 16, dtype=np.float32).reshape(64, 16) * value
    return {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("data"))),
                       "b": jax.device_put(np.full(16, value, np.float32), NamedSharding(mesh, P()))},
            "step": jax.device_put(np.int32(value), NamedSharding(mesh, P()))}


def abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_two(tmp_path):
    mesh = make_mesh()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=5, keep_best=0)
    for step in (1, 2):
        assert ckpt.save(step, make_state(mesh, float(step)), data_state={"position": step}, meta={"model": "m"})
    ckpt.close()
    return mesh


def data_files(step_dir: pathlib.Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files, sorted(step_dir.rglob("*"))
    return sorted(files, key=lambda p: p.stat().st_size)


def restore(tmp_path, mesh):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=5, keep_best=0)
    try:
        return ckpt.restore_latest(abstract(make_state(mesh, 0.0))), ckpt.all_steps()
    finally:
        ckpt.close()


def test_round_trip_is_exact_and_in_the_target_sharding(tmp_path):
    mesh = save_two(tmp_path)
    (step, state, data, meta), _ = restore(tmp_path, mesh)
    assert step == 2 and data == {"position": 2} and meta["model"] == "m"
    expected = make_state(mesh, 2.0)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state["params"]["w"].sharding.spec == P("data")


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "delete"])
def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path, damage, capsys):
    mesh = save_two(tmp_path)
    target = data_files(tmp_path / "checkpoints" / "2")[-1]
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_bytes":
        middle = len(raw) // 2
        target.write_bytes(raw[:middle] + bytes(b ^ 0x5A for b in raw[middle:middle + 64]) + raw[middle + 64:])
    else:
        target.unlink()
    (step, state, data, _), steps_left = restore(tmp_path, mesh)
    assert step == 1 and data == {"position": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["b"]), np.full(16, 1.0, np.float32))
    assert steps_left == [1]
    assert list((tmp_path / "checkpoints_corrupt").iterdir())
    assert "checkpoint 2 is damaged" in capsys.readouterr().out


def test_interrupted_save_leaves_previous_intact(tmp_path):
    mesh = save_two(tmp_path)
    # What a kill during a save leaves behind: an uncommitted temporary directory.
    tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    (step, _, data, _), steps_left = restore(tmp_path, mesh)
    assert step == 2 and steps_left == [1, 2]


def test_non_finite_state_is_never_saved(tmp_path, capsys):
    mesh = make_mesh()
    state = make_state(mesh, 1.0)
    state["params"]["b"] = state["params"]["b"].at[3].set(jnp.nan)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.save(5, state, data_state={"position": 5}, meta={}) is False
    ckpt.close()
    assert ckpt.all_steps() == []
    assert "checkpoint NOT saved" in capsys.readouterr().out


def test_keeps_last_k_plus_the_best(tmp_path):
    mesh = make_mesh()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, best_metric="eval/accuracy")
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.8)]:
        ckpt.save(step, make_state(mesh, float(step)), data_state={"position": step}, meta={},
                  metrics={"eval/accuracy": acc})
        ckpt.wait()
    ckpt.close()
    assert ckpt.all_steps() == [2, 4, 5]


def test_checksum_is_sharding_independent_and_sensitive():
    mesh = make_mesh()
    state = make_state(mesh, 3.0)
    host = jax.tree_util.tree_map(np.asarray, state)
    assert state_checksum(state) == state_checksum(host)
    changed = dict(host, params=dict(host["params"], b=host["params"]["b"].copy()))
    changed["params"]["b"][0] = np.nextafter(changed["params"]["b"][0], np.float32(10))
    assert state_checksum(changed)[0] != state_checksum(host)[0]


def test_describe_mismatch():
    saved = {"model": "a", "model_overrides": {}, "param_shapes": {"w": [2, 3], "b": [3]}}
    assert describe_mismatch(saved, dict(saved)) is None
    msg = describe_mismatch(saved, {"model": "a", "model_overrides": {}, "param_shapes": {"w": [2, 4], "c": [1]}})
    assert "w: checkpoint shape (2, 3) vs (2, 4)" in msg and "only in the checkpoint: ['b']" in msg
    assert "missing from the checkpoint: ['c']" in msg
