"""Perplexity: tokenize the evaluation text once, cut non-overlapping windows, score all but each window's
first token (the protocol of the reference figures in the docs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """windows: LongTensor [n, seq_len]. Returns {"ppl", "nll", "tokens"}."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    it = range(0, windows.shape[0], batch_size)
    for start in tqdm(it, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}
