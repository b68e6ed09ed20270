"""Accuracy validation of quantized variants against their baseline.

- `forge.eval.perplexity`: perplexity, top-1 agreement and KL divergence on fixed text windows,
  with the baseline's distributions saved once and streamed back for every variant;
- `forge.eval.lm_eval`: task accuracy (lm-evaluation-harness) over a served endpoint, and the
  recovery ratio quantized / baseline;
- `forge.eval.gates`: the recipe's thresholds checked by one generic validator.

Nothing is imported here so that `forge.eval.gates` (used when planning and reporting) does not
pull in torch.
"""
