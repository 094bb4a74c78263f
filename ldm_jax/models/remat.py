"""Named rematerialisation policies for the UNet's blocks (config key `remat`).

Each ResBlock and each attention layer (SpatialTransformer / AttentionBlock) is one `nn.remat`
unit; the policy says which of its intermediate values the forward pass keeps for the backward
pass (the block inputs are always kept), everything else is recomputed:

    none                 no remat: every intermediate is kept (fastest, most memory)
    blocks               nothing kept: each block runs twice (openaimodel's use_checkpoint)
    save_dots            keep matmul and convolution outputs (jax.checkpoint_policies
                         .dots_saveable), recompute norms, activations and softmax
    save_dots_no_batch   keep only the weight matmuls' outputs (dots_with_no_batch_dims_saveable):
                         the dense projections; convolutions and attention products recomputed
    offload_dots         the weight matmuls' outputs go to pinned host memory instead of being
                         kept on the device (offload_dot_with_no_batch_dims; GPU and TPU only)
"""

REMAT_POLICIES = ("none", "blocks", "save_dots", "save_dots_no_batch", "offload_dots")
HOST_OFFLOAD_POLICIES = ("offload_dots",)


def check_remat(name: str, backend: str | None = None) -> str:
    """`name` if it is a known policy usable on `backend` (None: not checked), else ValueError."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {name!r}; allowed: {', '.join(REMAT_POLICIES)}")
    if backend == "cpu" and name in HOST_OFFLOAD_POLICIES:
        raise ValueError(
            f"remat {name!r} offloads to host memory, which needs a GPU or TPU backend (this one "
            "is cpu); use save_dots_no_batch for the same saving without offload"
        )
    return name


def remat_policy(name: str):
    """The `jax.checkpoint` policy of a named remat choice (None for "none" and "blocks")."""
    import jax  # here, so config checks can name the policies before jax starts

    check_remat(name)
    policies = jax.checkpoint_policies
    if name == "save_dots":
        return policies.dots_saveable
    if name == "save_dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return None
