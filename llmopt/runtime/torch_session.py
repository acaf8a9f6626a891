"""The PyTorch reference: an HF model with its own DynamicCache behind the session interface."""

from __future__ import annotations

import numpy as np
import torch

from llmopt.models.registry import dims_of
from llmopt.runtime.base import DecoderSession


class TorchSession(DecoderSession):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:  # noqa: A002
        super().__init__()
        self.model = model.eval()
        self.dims = dims_of(model.config)
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model
        self.cache = None

    def reset(self, batch: int) -> None:
        self.cache = None

    @torch.inference_mode()
    def _step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = self._forward(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(positions), cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits.float().numpy()
