"""An independent, straightforward DiNAT forward written from upstream's semantics, for checking the runtime.

It reads the checkpoint's state dict by its Hugging Face key names and uses nothing of the runtime but
kernels' `reference` NA backend (itself checked against a literal loop).
"""

import torch
import torch.nn.functional as F

from dinat_batch.kernels import na2d


def upstream_forward(state: dict, config: dict, pixel_values: torch.Tensor):
    """-> (logits or None, pooled embeddings), as DinatForImageClassification computes them."""
    eps = config["layer_norm_eps"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    def dense(x, name):
        return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    p = "dinat.embeddings.patch_embeddings.projection"
    x = F.conv2d(pixel_values, state[f"{p}.0.weight"], state[f"{p}.0.bias"], stride=2, padding=1)
    x = F.conv2d(x, state[f"{p}.1.weight"], state[f"{p}.1.bias"], stride=2, padding=1)
    x = ln(x.permute(0, 2, 3, 1), "dinat.embeddings.norm")
    kernel = config["kernel_size"]
    for s, depth in enumerate(config["depths"]):
        heads = config["num_heads"][s]
        for layer in range(depth):
            name = f"dinat.encoder.levels.{s}.layers.{layer}"
            dilation = config["dilations"][s][layer]
            batch, height, width, channels = x.shape
            shortcut = x
            y = ln(x, f"{name}.layernorm_before")
            window = kernel * dilation
            y = F.pad(y, (0, 0, 0, max(0, window - width), 0, max(0, window - height)))
            ph, pw = y.shape[1], y.shape[2]
            head_dim = channels // heads
            q, k, v = (
                dense(y, f"{name}.attention.self.{proj}").reshape(batch, ph, pw, heads, head_dim)
                for proj in ("query", "key", "value")
            )
            rpb = state[f"{name}.attention.self.rpb"]
            a = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="reference").reshape(batch, ph, pw, channels)
            a = dense(a, f"{name}.attention.output.dense")[:, :height, :width]
            scale = state.get(f"{name}.layer_scale_parameters")
            if scale is not None:
                a = scale[0] * a
            x = shortcut + a
            m = dense(
                F.gelu(dense(ln(x, f"{name}.layernorm_after"), f"{name}.intermediate.dense")),
                f"{name}.output.dense",
            )
            if scale is not None:
                m = scale[1] * m
            x = x + m
        if f"dinat.encoder.levels.{s}.downsample.reduction.weight" in state:
            d = f"dinat.encoder.levels.{s}.downsample"
            x = F.conv2d(x.permute(0, 3, 1, 2), state[f"{d}.reduction.weight"], stride=2, padding=1)
            x = ln(x.permute(0, 2, 3, 1), f"{d}.norm")
    x = ln(x, "dinat.layernorm")
    pooled = x.flatten(1, 2).mean(dim=1)
    logits = (
        F.linear(pooled, state["classifier.weight"], state["classifier.bias"])
        if "classifier.weight" in state
        else None
    )
    return logits, pooled
