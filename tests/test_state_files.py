"""Optimizer, scheduler and RNG states stored as safetensors + JSON read back exactly."""

import random

import numpy as np
import pytest
import torch

from sapt.utils.state_files import StateFileError, load_state, save_state


def test_adamw_and_scheduler_state_round_trip_and_continue_identically(tmp_path):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        param.grad = torch.randn_like(param)
        optimizer.step()
        scheduler.step()
    save_state(tmp_path / "optimizer", optimizer.state_dict())
    save_state(tmp_path / "scheduler", scheduler.state_dict())

    copy = torch.nn.Parameter(param.detach().clone())
    restored = torch.optim.AdamW([copy], lr=5.0)
    restored_scheduler = torch.optim.lr_scheduler.LambdaLR(restored, lambda step: 1.0 / (1 + step))
    restored.load_state_dict(load_state(tmp_path / "optimizer"))
    restored_scheduler.load_state_dict(load_state(tmp_path / "scheduler"))
    assert restored.param_groups[0]["betas"] == (0.8, 0.99)
    grad = torch.randn_like(param)
    for p, opt, sched in ((param, optimizer, scheduler), (copy, restored, restored_scheduler)):
        p.grad = grad.clone()
        opt.step()
        sched.step()
    assert torch.equal(param, copy)  # the same next step: moments, step counts and lr all came back
    assert scheduler.get_last_lr() == restored_scheduler.get_last_lr()


def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_state(tmp_path / "rng", states)
    loaded = load_state(tmp_path / "rng")
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.random.set_rng_state(loaded["cpu"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert loaded["numpy"][1].dtype == np.uint32


def test_unstorable_values_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(StateFileError, match="cannot store a object"):
        save_state(tmp_path / "bad", {"fn": object()})
    assert not list(tmp_path.iterdir())


def test_a_damaged_state_file_gives_one_line_naming_it(tmp_path):
    save_state(tmp_path / "s", {"x": torch.ones(2)})
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(StateFileError, match=r"s\.json: malformed JSON"):
        load_state(tmp_path / "s")
