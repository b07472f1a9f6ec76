"""The hooks' contract: a frozen record per step in, what each produced out."""

import dataclasses

import pytest

from apo_jax.train import hooks


class _Returns(hooks.Hook):
    def __init__(self, every, out):
        self.every, self.out, self.seen = every, out, []

    def act(self, info):
        self.seen.append(dict(info.outputs))
        return self.out


class _FakeCheckpointer:
    def __init__(self):
        self.saved = []

    def poll(self):
        pass

    def save(self, step, state, data_state, meta, ranked):
        self.saved.append((step, meta, ranked))


class _FakeData:
    def get_state(self):
        return b"position"


def _info(step, **kw):
    return hooks.StepInfo(step=step, num_steps=10, state="state", **kw)


def test_a_hook_sees_what_earlier_hooks_returned_at_the_same_step_and_cannot_change_it():
    first, second = _Returns(2, {"eval/loss": 0.5}), _Returns(1, {"plots": "p"})
    after = lambda h, i: h.after_step(i)  # noqa: E731
    assert hooks.run_hooks([first, second], _info(3), after) == {"plots": "p"}
    assert second.seen == [{}]  # step 3: the first hook was not due
    out = hooks.run_hooks([first, second], _info(4), after)
    assert out == {"eval/loss": 0.5, "plots": "p"} and second.seen[-1] == {"eval/loss": 0.5}
    info = _info(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.step = 5
    with pytest.raises(TypeError):
        hooks.run_hooks([_Mutates()], info, after)


class _Mutates(hooks.Hook):
    every = 1

    def act(self, info):
        info.outputs["x"] = 1  # a read-only mapping: TypeError


def test_a_checkpoint_is_ranked_by_the_held_out_loss_of_its_own_step():
    ckpt = _FakeCheckpointer()
    save = hooks.Checkpoint(2, ckpt, _FakeData(), {"preset": "demo"})
    save.after_step(_info(2, outputs={"eval/loss": 0.25}))
    save.after_step(_info(3, outputs={"eval/loss": 0.5}))  # not due
    save.after_step(_info(4))  # due, no held-out loss measured at step 4
    save.after_step(_info(5, stopping=True))  # a stop saves whatever the cadence
    assert ckpt.saved == [
        (2, {"step": 2, "preset": "demo"}, {"eval/loss": 0.25}),
        (4, {"step": 4, "preset": "demo"}, None),
        (5, {"step": 5, "preset": "demo"}, None),
    ]
