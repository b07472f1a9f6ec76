"""Mesh, logical-axis rules, and a sharded forward/grad on 8 simulated CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from apo_jax import sharding

MESH_222 = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_logical_to_spec_rules_and_divisibility():
    spec = sharding.logical_to_spec(("layers", "embed", "heads"), (2, 64, 64), MESH_222)
    assert spec == PartitionSpec(None, "fsdp", "tensor")
    # 'batch' spans ('data', 'fsdp'); 6 rows divide data=2 but not data*fsdp=4 -> data only.
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), MESH_222) == PartitionSpec(
        ("data", "fsdp"), None
    )
    assert sharding.logical_to_spec(("batch", "length"), (6, 5), MESH_222) == PartitionSpec(
        "data", None
    )
    # vocab 129 is not divisible by tensor=2: stays replicated instead of failing.
    assert sharding.logical_to_spec(("vocab", "embed"), (129, 64), MESH_222) == PartitionSpec(
        None, "fsdp"
    )
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.logical_to_spec(("nope",), (4,), MESH_222)


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh()  # all devices on 'data'
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.shape["data"] == jax.device_count()
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(sharding.MeshError, match="does not divide"):
        sharding.make_mesh(data=1, fsdp=1, tensor=jax.device_count() + 1)
    with pytest.raises(sharding.MeshError, match="at most one"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_constrain_is_noop_outside_mesh():
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x


def test_param_shardings_serve_as_jit_in_and_out_shardings():
    from flax import nnx

    from apo_jax.models import Llama, get_preset

    cfg = get_preset("tiny", vocab_size=128)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh()
    shardings = sharding.param_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings)()
    fwd = jax.jit(
        lambda st, ids: nnx.merge(graphdef, st)(ids).sum(),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
    )
    assert jnp.isfinite(fwd(state, jnp.ones((2, 4), jnp.int32)))


_EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from apo_jax import sharding
    from apo_jax.models import get_preset, Llama
    from apo_jax.models.hf import load_hf, save_hf
    import sys

    assert jax.device_count() == 8, jax.devices()
    cfg = get_preset("tiny", vocab_size=128)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 12)))
    seg = jnp.asarray((np.arange(12)[None] < np.array([12, 9, 5, 12, 3, 12, 7, 1])[:, None]) * 1)

    def loss(state, graphdef, ids, seg):
        logits = nnx.merge(graphdef, state)(ids, segment_ids_BxT=seg)
        return (logits**2).mean(), logits

    model = nnx.jit(lambda: Llama(cfg, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ref_loss, logits_ref), ref_grads = fn(state, graphdef, ids, seg)

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharding.shard_model(model, mesh)
    q = model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 32)
    graphdef, state = nnx.split(model)
    ids_s = jax.device_put(ids, sharding.batch_sharding(mesh))
    seg_s = jax.device_put(seg, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):  # activation constraints are active inside the mesh
        (got_loss, logits), got_grads = fn(state, graphdef, ids_s, seg_s)
    assert logits.sharding.spec[0] == ("data", "fsdp"), logits.sharding
    np.testing.assert_allclose(logits, logits_ref, atol=2e-5)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)

    # load_hf places every tensor straight onto the mesh
    save_hf(model, cfg, sys.argv[1])
    loaded, _ = load_hf(sys.argv[1], mesh=mesh)
    k = loaded.layers.mlp.down_proj.kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp"), k.sharding
    np.testing.assert_allclose(k, model.layers.mlp.down_proj.kernel[...])
    print("OK")
    """
)


@pytest.mark.slow  # two subprocesses with 8 simulated devices
def test_sharded_forward_and_grads_match_single_device(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICE_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


_POOL_SCRIPT = textwrap.dedent(
    """
    import os
    import apo_jax  # noqa: F401  (sizes XLA's CPU thread pool before the backend exists)
    import jax

    jax.numpy.ones(2).block_until_ready()
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    print(jax.device_count(), sum(n.startswith("tf_XLAEigen") for n in names))
    """
)


def _pool(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", **extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", _POOL_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tuple(int(x) for x in proc.stdout.split())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_simulated_devices_get_four_xla_threads_each():
    """8 simulated devices on XLA's default max(cores, devices) pool could deadlock in collectives
    (one device with two in flight starves another); importing apo_jax sizes it 4 per device."""
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert _pool(flags) == (8, max(os.cpu_count(), 32))
    assert _pool({**flags, "PJRT_NPROC": "12"}) == (8, 12)  # an explicit setting wins
