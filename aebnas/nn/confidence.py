"""Exit confidence on logits, in torch: the one function training, ``infer`` and export use.

The numpy side (cached outputs, thresholds, costs) is ``aebnas.exit_policy``; both use
the same measures (``aebnas.settings.CONFIDENCE_MEASURES``).
"""

from __future__ import annotations

import math

import torch

from ..settings import DEFAULT_CONFIDENCE


def torch_confidence(logits: torch.Tensor, measure: str = DEFAULT_CONFIDENCE) -> torch.Tensor:
    """Confidence in [0, 1] of each row of ``logits`` (higher = more sure), float32.

    margin: top-1 minus top-2 softmax probability (the paper's score margin);
    max_prob: top-1 probability; entropy: 1 − H(p)/log(classes).
    Written so TorchScript compiles it: the exported model runs this very function.
    """
    probs = torch.softmax(logits.float(), dim=1)
    if measure == "margin":
        top2 = torch.topk(probs, 2, dim=1)[0]
        return top2[:, 0] - top2[:, 1]
    if measure == "max_prob":
        return torch.max(probs, dim=1)[0]
    if measure == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
        return 1.0 - ent / math.log(logits.shape[1])
    raise ValueError("confidence='" + measure + "' is not one of ('margin', 'max_prob', 'entropy')")
