"""LoRA: merged weights, adapters off = the base, adapter-only gradients, PEFT files, a LoRA run."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_step import CFG, make_batch

from apo_jax.config import ConfigError, base_config, with_overrides
from apo_jax.models import hf, lora
from apo_jax.models.llama import Llama
from apo_jax.optim import OptimConfig, make_optimizer
from apo_jax.train import loop
from apo_jax.train import model as model_lib
from apo_jax.train import train_step as ts

IDS = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 12)), jnp.int32)


@nnx.jit
def logits(model):
    """The model's logits on IDS, compiled (eager op-by-op runs are slow)."""
    return model(IDS)


def lora_model(lcfg, *, scan=True, b_scale=0.05):
    """(model with adapters, base graphdef, base params, logits before attaching); B made nonzero
    so the adapters change the outputs."""
    import dataclasses

    model = Llama(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    before = logits(model)
    base_graphdef, base_params = nnx.split(model)
    lora.attach(model, lcfg, seed=1)
    for _, lin in lora.targeted(model, lcfg.modules):
        shape = lin.lora_b.shape
        lin.lora_b.set_value(b_scale * jax.random.normal(jax.random.key(shape[-1]), shape))
    return model, base_graphdef, base_params, before


@pytest.mark.parametrize("scan,rslora", [(True, False), (False, True)])
def test_merged_kernel_is_base_plus_scale_b_a(scan, rslora):
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets="q,v,down", rslora=rslora)
    assert lcfg.scale == (8.0 / math.sqrt(4) if rslora else 8.0 / 4)
    model, base_graphdef, base_params, _ = lora_model(lcfg, scan=scan)
    _, adapters, _ = lora.split(model)
    merged = lora.merged_base(base_params, adapters, lcfg)
    flat_m, flat_b = dict(nnx.to_flat_state(merged)), dict(nnx.to_flat_state(base_params))
    n_adapted = 0
    for path, lin in lora.targeted(model, lcfg.modules):
        w, a, b = (np.asarray(v[...]) for v in (lin.kernel, lin.lora_a, lin.lora_b))
        want = w + lcfg.scale * np.einsum("...ir,...ro->...io", a, b)
        np.testing.assert_allclose(flat_m[(*path, "kernel")][...], want, rtol=1e-5, atol=1e-6)
        n_adapted += 1
    assert n_adapted == 3 * (1 if scan else CFG.n_layers)
    untouched = ("layers", "self_attn", "k_proj", "kernel") if scan else ("lm_head", "kernel")
    np.testing.assert_array_equal(flat_m[untouched][...], flat_b[untouched][...])
    # The merged plain model computes what the adapted one does.
    np.testing.assert_allclose(
        logits(nnx.merge(base_graphdef, merged)), logits(model), rtol=1e-4, atol=1e-5
    )


def test_fresh_adapters_start_at_the_base_and_a_is_peft_uniform():
    lcfg = lora.LoraConfig(rank=8)
    model = Llama(CFG, rngs=nnx.Rngs(0))
    before = logits(model)
    lora.attach(model, lcfg, seed=3)
    np.testing.assert_array_equal(logits(model), before)  # B = 0
    q = model.layers.self_attn.q_proj
    bound = 1 / math.sqrt(CFG.d_model)
    a = np.asarray(q.lora_a[...])
    assert a.shape == (CFG.n_layers, CFG.d_model, 8) and a.dtype == np.float32
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.any(np.asarray(q.lora_b[...]))
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")


def test_adapters_off_equals_base_log_probs():
    lcfg = lora.LoraConfig(rank=4)
    model, base_graphdef, base_params, before = lora_model(lcfg)
    graphdef, adapters, frozen = lora.split(model)
    np.testing.assert_array_equal(logits(nnx.merge(base_graphdef, base_params)), before)
    # The online reference of a LoRA step is the base graph over the same arrays (given as None:
    # the step takes it from `frozen`): its log-probs are the base model's, the policy's differ.
    batch = make_batch()
    online, none = ts.StepConfig(reference="online"), ts.StepConfig(reference="none")

    @jax.jit
    def run(adapters, frozen, base_params):
        lora_logps = ts.pair_logps(
            graphdef, nnx.merge_state(frozen, adapters), batch, online, base_params, base_graphdef
        )
        base_logps = ts.pair_logps(base_graphdef, base_params, batch, none)
        metrics = ts.eval_step(
            adapters, batch, None, frozen, graphdef=graphdef, cfg=online, ref_graphdef=base_graphdef
        )
        return lora_logps, base_logps, metrics

    lora_logps, base_logps, metrics = run(adapters, frozen, base_params)
    np.testing.assert_allclose(lora_logps.ref_chosen, base_logps.chosen, rtol=1e-6)
    assert float(jnp.abs(lora_logps.chosen - lora_logps.ref_chosen).max()) > 1e-4
    rewards = 0.1 * (lora_logps.chosen - lora_logps.ref_chosen)
    np.testing.assert_allclose(metrics["rewards/chosen"], jnp.mean(rewards), rtol=1e-5)


def test_gradients_and_optimizer_state_cover_the_adapters_only():
    lcfg = lora.LoraConfig(rank=4, dropout=0.5)
    model, *_ = lora_model(lcfg)
    graphdef, adapters, frozen = lora.split(model)
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-2, schedule="constant"), 10)
    state = ts.init_state(adapters, tx, 0)
    frozen_before = jax.tree.map(np.asarray, frozen)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt < 2 * n_adapter + 10  # Adam's two moments of the adapters, nothing of the base
    step = jax.jit(
        lambda s, b, f: ts.train_step(s, b, None, f, graphdef=graphdef, tx=tx, cfg=ts.StepConfig())
    )
    batch = make_batch()
    new, m = step(state, batch, frozen)
    assert int(new.skipped) == 0 and float(m["grad_norm"]) > 0
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True)
    ]
    assert all(changed)  # every adapter matrix moved
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # the base is an input, never updated
    # Dropout masks come from the step's RNG: another key, another gradient.
    other = state.replace(rng=jax.random.key_data(jax.random.key(9)))
    _, m2 = step(other, batch, frozen)
    assert abs(float(m2["grad_norm"]) - float(m["grad_norm"])) > 1e-6


def test_peft_round_trip_equal_logits(make_hf_llama, tmp_path):
    import peft
    import torch
    import transformers

    path, _ = make_hf_llama()
    model, cfg = hf.load_hf(path)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down", rslora=True)
    lora.attach(model, lcfg, seed=0)
    for _, lin in lora.targeted(model, lcfg.modules):
        lin.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(7), lin.lora_b.shape))
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(2, 10))
    run = nnx.jit(lambda m: m(jnp.asarray(ids)))
    ours = np.asarray(run(model))
    out = str(tmp_path / "adapter")
    _, adapters, _ = lora.split(model)
    lora.save_peft(adapters, lcfg, cfg.n_layers, out, base_path=str(path))
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(path)
    base = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # Back in: the adapter directory loads merged (evaluation) and onto fresh adapters (training).
    merged, _ = lora.load_merged(out)
    np.testing.assert_allclose(np.asarray(run(merged)), ours, rtol=1e-4, atol=1e-4)
    fresh, _ = hf.load_hf(path)  # same graph as `model`: no recompile
    read_cfg, read_base = lora.read_adapter_config(out)
    assert (read_cfg.rank, read_cfg.rslora, read_base) == (4, True, os.path.abspath(path))
    lora.load_peft(lora.attach(fresh, read_cfg, seed=5), out, read_cfg)
    np.testing.assert_allclose(np.asarray(run(fresh)), ours, rtol=1e-4, atol=1e-4)
    # `python -m apo_jax.eval --model=<adapter dir>` takes it, reading its base's config.
    from apo_jax.eval import runner

    assert runner.resolve_model_dir(out) == out
    assert runner._max_positions(out) == cfg.max_seq_len
    assert runner.weights_fingerprint(out) != runner.weights_fingerprint(str(path))
    # A run given the adapter as its model continues training it on its base.
    from apo_jax import config as config_lib

    c = with_overrides(base_config("apo_down", None), {"model.hf_path": out, "lora.rank": 8})
    rc = config_lib.validate(c, device_count=1)
    assert (rc.lora.rank, rc.lora.rslora, rc.lora.adapter) == (4, True, out)
    assert model_lib.base_path(rc) == os.path.abspath(path)


def test_a_resume_onto_another_base_is_refused():
    base = {"path": "/a", "fingerprint": "123"}
    model_lib.check_base(base, dict(base), "checkpoint x")
    with pytest.raises(ConfigError, match="trained on base /a .*fingerprint 123"):
        model_lib.check_base(base, {"path": "/b", "fingerprint": "456"}, "checkpoint x")


def test_config_lora_errors_name_the_field():
    from apo_jax import config as config_lib

    c = with_overrides(base_config("apo_down", None), {"lora.rank": 4, "lora.targets": "q,zz"})
    with pytest.raises(ConfigError, match="lora.targets: unknown module 'zz'"):
        config_lib.validate(c, device_count=1)


def _run(workdir, hf_path, shards, tok_dir, steps, **extra):
    o = {
        "model.hf_path": str(hf_path),
        "data.train": shards,
        "data.tokenizer": tok_dir,
        "data.seq_len": 144,
        "data.layout": "concat",
        "batch_size": 4,
        "num_steps": steps,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint.every": 2,
        "checkpoint.async_save": False,
        "progress_bar": False,
        "lora.rank": 8,
        "optim.learning_rate": 1e-2,
        "optim.schedule": "constant",
        "optim.warmup_steps": 0,
        "reference.mode": "online",
        "samples.num_prompts": 0,
        "plots": False,
    }
    o.update(extra)
    return loop.train_and_evaluate(with_overrides(base_config("apo_down", None), o), workdir)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_lora_run_resumes_exactly_and_exports_peft(make_hf_llama, small_shards, tok_dir, tmp_path):
    import peft
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)  # training refuses other special ids
    path, _ = make_hf_llama(
        vocab_size=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    _run(straight, path, small_shards, tok_dir, 4)
    # The checkpoint holds adapters and optimizer only, and names its base.
    ckpt = os.path.join(straight, "checkpoints", "2")
    with open(os.path.join(ckpt, "meta", "metadata")) as f:
        assert json.load(f)["base"]["path"] == os.path.abspath(path)
    shutil.copytree(ckpt, os.path.join(split, "checkpoints", "2"))  # a run stopped at step 2
    shutil.copy(os.path.join(straight, "config.json"), split)  # (checkpoints alone are refused)
    _run(split, path, small_shards, tok_dir, 4)
    want, got = _losses(straight), _losses(split)
    assert sorted(got) == [3, 4] and want[1] != want[4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6), (s, want, got)
    # hf_adapter loads with PEFT onto the base and equals the merged export.
    ids = torch.as_tensor(np.random.default_rng(2).integers(3, 500, size=(1, 12)))
    base = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, os.path.join(split, "hf_adapter")).eval()
    merged = transformers.LlamaForCausalLM.from_pretrained(os.path.join(split, "hf")).eval()
    with torch.no_grad():
        a, b = peft_model(ids).logits.numpy(), merged(ids).logits.numpy()
        plain = transformers.LlamaForCausalLM.from_pretrained(path).eval()(ids).logits.numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(a - plain).max() > 1e-4  # training moved the adapters off B = 0


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_peft_round_trip_other_families(family, tmp_path):
    """Adapters on a family with biases and tied embeddings (Qwen2) and one with scaled
    embeddings, extra norms and sliding layers (Gemma 3) load into PEFT with equal logits."""
    import peft
    import torch
    import transformers
    from test_families import hf_config

    torch.manual_seed(0)
    base_t = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    path = str(tmp_path / "base")
    base_t.save_pretrained(path)
    model, cfg = hf.load_hf(path)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    lora.attach(model, lcfg, seed=0)
    for _, lin in lora.targeted(model, lcfg.modules):
        lin.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(3), lin.lora_b.shape))
    ids = np.random.default_rng(4).integers(3, cfg.vocab_size, size=(1, 9))
    ours = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids)))(model))
    _, adapters, _ = lora.split(model)
    lora.save_peft(adapters, lcfg, cfg.n_layers, str(tmp_path / "adapter"), base_path=path)
    peft_model = peft.PeftModel.from_pretrained(base_t, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)
