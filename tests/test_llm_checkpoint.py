"""Checkpoints of drosim.llm.components.checkpoint: exact round trips, exact resumption, atomicity.

The model is a one-layer GPT-2 with tied embedding and output weights and dropout on, so a
resumed run only matches an uninterrupted one if weights, AdamW moments, the LR schedule and
every global generator all come back exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drosim.llm.components.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

VOCAB = 50


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global state is what checkpoints capture)
    torch.manual_seed(seed)


def _make_run(seed: int = 0):
    """A fresh tiny policy, its AdamW and a warm-up schedule, built deterministically."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32)
    model = GPT2LMHeadModel(config)
    model.train()  # dropout on: every step draws from torch's generator
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    """Steps whose data come from python's and numpy's generators, and dropout from torch's."""
    for _ in range(steps):
        length = random.randint(4, 8)
        ids = torch.from_numpy(np.random.randint(0, VOCAB, size=(3, length)))  # noqa: NPY002
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _draws() -> tuple:
    return (torch.rand(4), random.random(), np.random.rand(3))  # noqa: NPY002


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_state_dicts_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def _save(run_dir: Path, iteration: int, run=None, keep: int = 2, **extra) -> Path:
    """Save ``run`` (default: a fresh run seeded with ``iteration``) as that iteration."""
    model, optimizer, scheduler = run or _make_run(seed=iteration)
    state = TrainState(iteration=iteration, data_position=8 * iteration, extra=extra)
    return save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=state, keep=keep)


def _load(path: Path) -> tuple[TrainState, torch.nn.Module]:
    model, optimizer, scheduler = _make_run(seed=123)
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    return state, model


# ---------------------------------------------------------------------------------- round trip


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    _seed_everything(0)
    model, optimizer, scheduler = run = _make_run()
    _train(*run, steps=3)
    path = _save(tmp_path, 3, run, config={"lr": 1e-2}, losses=[0.5, 0.25])
    expected_draws = _draws()

    _seed_everything(99)  # disturb every generator before loading
    fresh = _make_run(seed=1)
    state = load_checkpoint(path, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])

    assert state == TrainState(iteration=3, data_position=24,
                               extra={"config": {"lr": 1e-2}, "losses": [0.5, 0.25]})
    _assert_state_dicts_equal(fresh[0].state_dict(), model.state_dict())
    assert fresh[0].lm_head.weight is fresh[0].transformer.wte.weight  # still tied
    _assert_state_dicts_equal(fresh[1].state_dict(), optimizer.state_dict())
    assert fresh[2].state_dict() == scheduler.state_dict()
    assert fresh[1].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    draws = _draws()
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1] == expected_draws[1]
    np.testing.assert_array_equal(draws[2], expected_draws[2])


def test_resumed_training_is_bitwise_identical_to_uninterrupted(tmp_path):
    _seed_everything(0)
    uninterrupted = _make_run()
    _train(*uninterrupted, steps=2)
    path = _save(tmp_path, 2, uninterrupted)
    _train(*uninterrupted, steps=3)

    _seed_everything(7)
    resumed = _make_run(seed=5)
    load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    _train(*resumed, steps=3)

    _assert_state_dicts_equal(resumed[0].state_dict(), uninterrupted[0].state_dict())
    _assert_state_dicts_equal(resumed[1].state_dict(), uninterrupted[1].state_dict())


def test_run_without_scheduler_round_trips(tmp_path):
    model, optimizer, _ = _make_run()
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=None,
                           state=TrainState(iteration=1, data_position=4, extra={}))
    assert not (path / "scheduler.pt").exists()

    fresh_model, fresh_optimizer, fresh_scheduler = _make_run(seed=1)
    state = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=None)
    assert state.iteration == 1
    _assert_state_dicts_equal(fresh_model.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match=r"scheduler\.pt"):
        load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer,
                        scheduler=fresh_scheduler)


def test_ddp_wrapped_model_is_saved_unwrapped(tmp_path):
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1), rank=0,
        world_size=1)
    try:
        model, optimizer, scheduler = _make_run()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        path = save_checkpoint(tmp_path / "run", model=wrapped, optimizer=optimizer,
                               scheduler=scheduler, state=TrainState(1, 4, {}))
    finally:
        torch.distributed.destroy_process_group()
    _, plain = _load(path)  # names without "module.": a plain model loads strictly
    _assert_state_dicts_equal(plain.state_dict(), model.state_dict())


def test_mismatched_model_is_rejected(tmp_path):
    path = _save(tmp_path, 1)
    bigger = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB,
                                        n_positions=32))
    optimizer = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(path, model=bigger, optimizer=optimizer, scheduler=None)


# ------------------------------------------------------------------------ layout and pointers


def test_latest_names_the_newest_checkpoint_and_old_ones_are_pruned(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for iteration in range(1, 6):
        path = _save(tmp_path, iteration, keep=2)
        assert path == tmp_path / "checkpoints" / f"iteration-{iteration:06d}"
        assert latest_checkpoint(tmp_path) == path
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iteration-000004", "iteration-000005", "latest"]

    _save(tmp_path, 6, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iteration-000006", "latest"]


def test_checkpoint_files_and_state_json(tmp_path):
    path = _save(tmp_path, 7, metric=1.5)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt",
        "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest) == ["model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt",
                                "state.json"]
    assert all(len(digest) == 64 for digest in manifest.values())  # sha256
    assert json.loads((path / "state.json").read_text()) == {
        "iteration": 7, "data_position": 56, "extra": {"metric": 1.5}}
    rng = torch.load(path / "rng.pt", weights_only=True)  # no pickled code needed
    assert set(rng) == {"python", "numpy", "torch", "cuda"}


def test_leftover_tmp_and_unpointed_partial_checkpoints_are_ignored(tmp_path):
    good = _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    # A save killed before renaming, and one killed after renaming but before `latest`
    # moved (here also half deleted): neither may be trusted.
    tmp = root / ".tmp-iteration-000002-abc123"
    tmp.mkdir()
    shutil.copy(good / "model.safetensors", tmp)
    partial = root / "iteration-000002"
    partial.mkdir()
    shutil.copy(good / "model.safetensors", partial)

    assert latest_checkpoint(tmp_path) == good
    assert _load(good)[0].iteration == 1
    with pytest.raises(FileNotFoundError, match=r"incomplete checkpoint .*optimizer\.pt"):
        _load(partial)

    # The next save replaces the partial directory and clears the leftovers.
    new = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == new == partial
    assert _load(new)[0].iteration == 2
    assert sorted(p.name for p in root.iterdir()) == [
        "iteration-000001", "iteration-000002", "latest"]


def test_saving_an_earlier_iteration_drops_the_abandoned_later_ones(tmp_path):
    for iteration in (1, 2, 3):
        _save(tmp_path, iteration, keep=3)
    _save(tmp_path, 2, keep=3)  # resumed from iteration 1 and saved again
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "iteration-000001", "iteration-000002", "latest"]
    assert latest_checkpoint(tmp_path) == root / "iteration-000002"


def test_missing_checkpoint_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere"):
        _load(tmp_path / "nowhere")


def test_invalid_arguments_write_nothing(tmp_path):
    with pytest.raises(TypeError, match="JSON serializable"):
        _save(tmp_path, 1, bad=object())
    with pytest.raises(ValueError, match="keep"):
        _save(tmp_path, 1, keep=0)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------- crash at every step


class _Crash(BaseException):
    """Stands for SIGKILL: a BaseException, so no `except Exception` cleanup runs."""


def _crash_on_call(monkeypatch, crash_at: int) -> list[str]:
    """Make the ``crash_at``-th filesystem mutation or fsync raise; returns the calls seen."""
    calls: list[str] = []
    for module, name in ((os, "replace"), (os, "fsync"), (shutil, "rmtree")):
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == crash_at:
                raise _Crash
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("resave", [False, True], ids=["new-iteration", "same-iteration"])
def test_a_crash_at_any_step_of_a_save_leaves_a_usable_checkpoint(tmp_path, monkeypatch,
                                                                   resave):
    # Iterations 1 and 2 are saved with keep=1, so the crashing save also prunes iteration 2
    # (or, re-saving iteration 2, replaces the directory `latest` names).
    iteration = 2 if resave else 3
    before, crashing = _make_run(seed=2), _make_run(seed=30)
    dry_run = tmp_path / "dry"
    _save(dry_run, 1, keep=1)
    _save(dry_run, 2, before, keep=1)
    with monkeypatch.context() as patch:
        calls = _crash_on_call(patch, crash_at=0)
        _save(dry_run, iteration, crashing, keep=1)
    assert len(calls) > 10

    for crash_at in range(1, len(calls) + 1):
        run_dir = tmp_path / f"crash-{crash_at}"
        _save(run_dir, 1, keep=1)
        _save(run_dir, 2, before, keep=1)
        with monkeypatch.context() as patch:
            _crash_on_call(patch, crash_at)
            with pytest.raises(_Crash):
                _save(run_dir, iteration, crashing, keep=1)

        state, model = _load(latest_checkpoint(run_dir))
        weights = model.state_dict()
        if torch.equal(weights["lm_head.weight"], before[0].lm_head.weight):
            assert state.iteration == 2
            _assert_state_dicts_equal(weights, before[0].state_dict())
        else:
            assert state.iteration == iteration
            _assert_state_dicts_equal(weights, crashing[0].state_dict())
        # ...and the run goes on saving.
        new = _save(run_dir, 4, keep=1)
        assert latest_checkpoint(run_dir) == new


def _overwrite_first_weight(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    name = next(iter(weights))
    weights[name].reshape(-1)[0] = 1e30
    save_file(weights, path / "model.safetensors")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:50]),
     r"model\.safetensors missing or changed"),
    (lambda p: (p / "optimizer.pt").write_bytes((p / "optimizer.pt").read_bytes()[:-10]),
     r"optimizer\.pt missing or changed"),
    (lambda p: (p / "rng.pt").write_bytes(b""), r"rng\.pt missing or changed"),
    (_overwrite_first_weight, r"model\.safetensors missing or changed"),
    (lambda p: (p / "manifest.json").write_text("{"), "unreadable manifest"),
])
def test_a_damaged_checkpoint_is_detected_before_anything_is_loaded(tmp_path, damage, message):
    from drosim.llm.components.checkpoint import CorruptCheckpointError, verify_checkpoint

    path = _save(tmp_path, 3)
    verify_checkpoint(path)
    damage(path)
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checkpoint(path)


def test_a_state_without_a_key_is_detected_even_without_a_manifest(tmp_path):
    from drosim.llm.components.checkpoint import CorruptCheckpointError, verify_checkpoint

    path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()  # as written before manifests existed
    (path / "state.json").write_text(json.dumps({"iteration": 3, "extra": {}}))
    with pytest.raises(CorruptCheckpointError, match="lacks data_position"):
        verify_checkpoint(path)


def test_resume_candidates_are_latest_then_the_older_ones(tmp_path):
    from drosim.llm.components.checkpoint import checkpoints_newest_first

    assert checkpoints_newest_first(tmp_path) == []
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    assert checkpoints_newest_first(tmp_path) == [second, first]


def test_a_full_disk_in_torch_s_writer_is_one_oserror_and_keeps_the_previous(small_fs):
    # torch's zip writer reports a full disk as a RuntimeError that does not say why
    import errno

    from drosim.llm.components.checkpoint import checkpoints_newest_first, verify_checkpoint

    mount = small_fs
    _save(mount, 1)
    # room for model.safetensors (about 20 KB) but not for optimizer.pt
    free = shutil.disk_usage(mount).free
    (mount / "filler").write_bytes(b"\0" * (free - 28 * 1024))
    with pytest.raises(OSError) as raised:
        _save(mount, 2)
    assert raised.value.errno == errno.ENOSPC
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert "cannot write the checkpoint of iteration 2" in str(raised.value)
    assert "\n" not in str(raised.value)
    (newest,) = checkpoints_newest_first(mount)
    assert newest.name == "iteration-000001"
    verify_checkpoint(newest)
    assert sorted(p.name for p in (mount / "checkpoints").iterdir()) == [
        "iteration-000001", "latest"]
