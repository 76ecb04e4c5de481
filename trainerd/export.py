"""Export a small MLP policy to ONNX, following the policy contract (velo.core.state).

This is the shape of what the learner will export, and a ready policy for tests and for
bootstrapping a fleet before training. PyTorch is imported inside the function so that the
rest of trainerd (store, registry, server) imports fast.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

# A masked action's logit: far enough below any real logit that softmax gives it exactly 0.0
# in float32, yet finite, so the graph never computes inf - inf.
MASKED_LOGIT = -1e9


def export_mlp_policy(
    path: str | Path | None = None,
    top_p: int = 5,
    embed_dim: int = 384,
    seed: int = 0,
    bias: tuple[float, float, float] | None = None,
    hidden: int = 64,
    embed_proj: int = 32,
) -> bytes:
    """Build a randomly initialised MLP policy and return its ONNX bytes (also written to
    `path` when given).

    The graph: concat(flatten(correlation), Linear(embedding)) -> MLP -> 3 logits (+ `bias`,
    which lets a test force a preferred action) -> masked softmax -> probs. The batch axis is
    dynamic.
    """
    import torch
    from torch import nn

    class MlpPolicy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(embed_dim, embed_proj)
            self.mlp = nn.Sequential(
                nn.Linear(3 * top_p + embed_proj, hidden),
                nn.Tanh(),
                nn.Linear(hidden, hidden),
                nn.Tanh(),
                nn.Linear(hidden, 3),
            )
            self.register_buffer("logit_bias", torch.tensor(bias or (0.0, 0.0, 0.0)))

        def forward(self, correlation: torch.Tensor, embedding: torch.Tensor,
                    action_mask: torch.Tensor) -> torch.Tensor:
            features = torch.cat([correlation.flatten(1), self.embed(embedding)], dim=1)
            logits = self.mlp(features) + self.logit_bias
            # Masking inside the graph: the edge can never pick an invalid action, whatever
            # the weights say. (All three masked would give uniform probabilities; the edge
            # always offers B.)
            logits = torch.where(action_mask > 0.5, logits, torch.full_like(logits, MASKED_LOGIT))
            return torch.softmax(logits, dim=-1)

    # Seed a private copy of the RNG so the caller's torch random state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MlpPolicy().eval()

    example = (
        torch.zeros(1, 3, top_p),
        torch.zeros(1, embed_dim),
        torch.ones(1, 3),
    )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 still ships the TorchScript exporter but warns that it is deprecated; it
        # needs no onnxscript and handles this graph, so keep it until the learner moves on.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            example,
            buffer,  # type: ignore[arg-type]  # torch annotates paths only; a file works too
            input_names=["correlation", "embedding", "action_mask"],
            output_names=["probs"],
            dynamic_axes={
                "correlation": {0: "batch"},
                "embedding": {0: "batch"},
                "action_mask": {0: "batch"},
                "probs": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
