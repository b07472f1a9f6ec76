"""Fields shared by every objective's config; see docs/training.md for each one.

`configs/<objective>.py` files call `base_config(loss, preset)`; `apo_jax.config.validate` checks them.
"""

import ml_collections

from apo_jax import losses

DEMO_SEQ_LEN = 128  # data.seq_len=-1 on the demo data: single-turn rows are at most about 80 tokens
DEMO_BETA = 5.0  # loss.beta=-1 on the demo data (docs/training.md, "The demo")
DEMO_SAMPLE_PROMPTS = 64  # samples.num_prompts=-1: held-out prompts scored on the demo data
SAMPLE_PROMPTS = 3  # samples.num_prompts=-1 on your data

RUN_PRESETS = (
    "demo",
    "llama3_1b",
    "llama3_8b",
    "qwen2_5_7b",
    "qwen3_8b",
    "mistral_7b",
    "gemma3_4b",
)


def base_config(loss: str, preset: str | None) -> ml_collections.ConfigDict:
    """The full config for `loss` (a losses.py name or mixture) and a preset name."""
    preset = preset or "demo"
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = preset  # which preset filled the fields below (informational)
    c.seed = 0  # model init, data shuffle and step RNG

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # models/config.py preset when hf_path is empty
    c.model.hf_path = (
        ""  # HF checkpoint dir (Llama, Qwen2/3, Mistral, Gemma 3 text) for policy and reference
    )
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # master weight dtype
    c.model.remat = "none"  # none | full | save_dots
    c.model.scan_layers = True  # one compiled block for all layers (False unrolls them)
    c.model.attention = (
        "auto"  # auto (cuDNN on GPU for 16-bit, blocked on CPU) | xla | cudnn | blocked
    )

    c.lora = ml_collections.ConfigDict()  # LoRA adapters on a frozen base (docs/training.md)
    c.lora.rank = 0  # adapter rank r; 0 = off (every parameter trains)
    c.lora.alpha = 16.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.0  # dropout on the adapters' input during training steps
    c.lora.targets = "q,k,v,o,gate,up,down"  # adapted linears, short or HF names
    c.lora.rslora = False  # rank-stabilized scaling
    c.lora.adapter = ""  # PEFT adapter dir to continue from (its r, alpha, targets are used)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # prepared shard dir (python -m apo_jax.data.prepare); empty: the demo
    c.data.eval = ""  # held-out shard dir; empty: no held-out evaluation (the demo has its own)
    c.data.tokenizer = ""  # tokenizer dir copied into HF exports; default: the shards' manifest
    c.data.seq_len = 0  # row length T; 0: the shards' max_length; -1: 128 on the demo data, else 0
    c.data.buckets = ()  # optional row lengths to pad each batch to (fewer recompiles, less padding)
    c.data.layout = "auto"  # auto (picked from the data) | concat | prefix | packed | unpaired
    c.data.num_epochs = 1  # passes over the training shards
    c.data.shuffle = True
    c.data.worker_count = 0  # grain worker processes (0 reads in the main process)
    c.data.verify = "fast"  # shards vs manifest before training: fast (sizes, ends) | full | off

    c.loss = ml_collections.ConfigDict()
    c.loss.name = loss  # losses.py name or mixture, e.g. "apo_zero + 0.1*sft"
    c.loss.beta = 0.1  # the paper's and TRL's default
    c.loss.label_smoothing = 0.0
    c.loss.discopop_tau = 0.05
    c.loss.simpo_gamma = 0.5
    c.loss.f_divergence_type = (
        "reverse_kl"  # | forward_kl | js_divergence | alpha_divergence (f-DPO)
    )
    c.loss.f_alpha_divergence_coef = 0.5  # alpha of alpha_divergence
    c.loss.use_weighting = False  # WPO: weight each pair by its sequences' probabilities (concat)
    c.loss.ld_alpha = 1.0  # LD-DPO: weight of the longer completion's tail; 1 = off (concat)
    c.loss.desirable_weight = 1.0  # kto / apo_zero_unpaired: factor of desirable examples' loss
    c.loss.undesirable_weight = 1.0  # and of undesirable examples' loss

    c.reference = ml_collections.ConfigDict()
    c.reference.mode = (
        "auto"  # auto | precomputed | online | none (auto: precompute once, then read)
    )
    c.reference.dtype = "float32"  # dtype of the frozen reference weights and compute
    c.reference.sync_ref_model = False  # TR-DPO: mix the policy into the online reference
    c.reference.ref_model_mixup_alpha = 0.6  # ref <- alpha * policy + (1 - alpha) * ref
    c.reference.ref_model_sync_steps = 512  # every this many steps

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | rmsprop | adafactor | sgd
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 0
    c.optim.schedule = "linear"  # cosine | linear | constant, after warmup
    c.optim.end_lr_factor = 0.0
    c.optim.weight_decay = 0.0
    c.optim.decay_mask = "no_norms"  # all | no_norms | no_norms_no_embed
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.0
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the devices left by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.batch_size = 16  # pairs per optimizer step, all processes together
    c.grad_accum = 1  # micro-batches per step (batch_size must divide)
    c.num_steps = 0  # 0: as many as num_epochs give
    c.logprob_chunk = 128  # time steps per chunk of the log-prob head (docs/performance.md)
    c.max_bad_steps = 5  # consecutive non-finite steps before the run stops

    c.log_every = 10  # console/metrics.jsonl/TensorBoard every N steps
    c.eval_every = 100  # held-out evaluation every N steps (0: only at the end)
    c.eval_batches = 0  # 0: the whole held-out split
    c.progress_bar = True
    c.wandb_project = ""  # log to Weights & Biases when set and wandb is installed

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200  # steps between saves (0: only at the end and on SIGTERM)
    c.checkpoint.keep = 3  # latest checkpoints kept
    c.checkpoint.keep_best = 1  # plus the best by held-out loss (0: off)
    c.checkpoint.async_save = True
    c.export_hf = True  # write <workdir>/hf at the end (safetensors + config + tokenizer)
    c.plots = False  # write PNG figures of metrics.jsonl to <workdir>/plots at the end

    c.samples = ml_collections.ConfigDict()  # greedy generations at each held-out evaluation
    c.samples.num_prompts = 0  # prompts generated each time (0: off); one process only
    c.samples.prompts = ""  # prompt or messages rows ('': the demo's or the eval split's source)
    c.samples.max_new_tokens = 128  # tokens generated per prompt at most
    c.samples.checker = ""  # module:function scoring each response ('': demo data's own checker)

    c.distributed = ml_collections.ConfigDict()  # multi-process runs; see docs/scaling.md
    c.distributed.mode = "auto"  # auto: join when config/env/SLURM/TPU pod says so | on | off
    c.distributed.coordinator_address = ""  # process 0's host:port; "" = env or cluster
    c.distributed.num_processes = 0  # 0 = JAX_NUM_PROCESSES or cluster detection
    c.distributed.process_id = -1  # -1 = JAX_PROCESS_ID or cluster detection
    c.distributed.initialization_timeout = 300  # seconds for every process to join, then an error

    c.demo = ml_collections.ConfigDict()
    c.demo.cache_dir = ""  # default ~/.cache/apo_jax/demo
    c.demo.n_train = 3000
    c.demo.n_eval = 300
    c.demo.multi_turn = 0.0  # fraction of multi-turn conversations (long rows, slower on a CPU)
    c.demo.warm_start_steps = 300  # sft steps of the model the demo starts from (cached); 0: random

    if preset == "demo":
        c.model.preset = "tiny"
        c.data.seq_len = -1  # 128 on the demo's rows; your shards' max_length on your data
        # The demo starts from a model already trained on the answers' format (the warm start):
        # small steps, and a beta that keeps both likelihoods near it, so its samples stay legible.
        c.loss.beta = -1  # 5.0 on the demo data; 0.1 (the paper's) on yours
        c.optim.learning_rate = 1e-4
        c.optim.warmup_steps = 10
        # 32 pairs a step; an unpaired loss takes as many completions (64 rows)
        c.batch_size = 64 if losses.is_unpaired(loss) else 32
        c.num_steps = 0
        c.data.num_epochs = 1
        c.eval_every = 50
        c.log_every = 10
        c.checkpoint.every = 50
        c.plots = True
        c.samples.num_prompts = -1  # 64 on the demo data, 3 on yours; off with no held-out split
        c.samples.max_new_tokens = 48
    elif preset in RUN_PRESETS:
        # The paper's setting for Llama-3-8B-Instruct on CLAIR pairs, for any family's checkpoint
        # of about that size (models/config.py presets); pass model and data paths.
        c.model.preset = preset
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.reference.dtype = "bfloat16"
        c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device
        c.optim.name = "rmsprop"
        c.optim.learning_rate = 2e-7
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 0
        c.batch_size = 16
        c.data.num_epochs = 18
        c.eval_every = 200
        c.checkpoint.every = 500
    return c


def with_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted fields, as `--config.a.b=v` does on the command line (unknown fields raise)."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        node[leaf] = value
    return c
