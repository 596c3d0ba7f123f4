"""Models built on the moe_jax MoE layer."""
