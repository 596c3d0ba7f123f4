"""moe_jax: fast Mixture-of-Experts inference with predictive expert replication (JAX/Flax)."""

import setuptools

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Expert-parallel MoE inference in JAX with one-layer-ahead predictive replication.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*"]),
    include_package_data=True,
    package_data={"moe_jax": ["assets/**/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        "peer": ["torch>=2.4", "transformers>=5.24"],
    },
)
