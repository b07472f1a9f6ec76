"""apo_jax: Anchored Preference Optimization and CLAIR data in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "transformers>=5.0",
    "datasets>=5.0",
    "safetensors>=0.6",
    "tokenizers>=0.22",
    "jinja2>=3.1",  # chat templates (transformers needs it but does not declare it)
    "numpy>=2.0",
    "rapidfuzz>=3.9",  # Levenshtein distance for contrastiveness statistics
    "tqdm>=4.66",  # progress bars
    "matplotlib>=3.8",  # contrastiveness histograms
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "gguf>=0.19",  # GGUF (llama.cpp) files in and out: reader, writer, dequantization
]

EXTRAS_REQUIRE = {
    # torch for parity tests against transformers' PyTorch Llama (pinned to the CPU wheel); trl for
    # parity tests of the losses against TRL's own functions; peft for the LoRA adapter round trip.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",
        "trl==1.16.0",
        "peft>=0.13",
        "ruff==0.17.6",  # tests/test_format.py: the formatter and linter CI checks with
    ],
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "dev": ["ruff==0.17.6"],
}

setuptools.setup(
    name="apo_jax",
    version="0.1.0",
    description="Anchored Preference Optimization (APO) and CLAIR preference data in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ is the one copy of the built-in configs; wheels carry it as apo_jax.configs.
    packages=[*setuptools.find_packages(include=["apo_jax", "apo_jax.*"]), "apo_jax.configs"],
    package_dir={"apo_jax.configs": "configs"},
    package_data={"apo_jax.data.examples": ["*.jsonl"]},  # the real-model quick start's files
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
