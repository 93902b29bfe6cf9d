"""el-fairseq: the encouraging loss (Zhao et al., arXiv 2110.06537) as a fairseq user-dir plugin, and
for any PyTorch model.

    fairseq-train ... --user-dir $(el-fairseq-user-dir) --criterion encouraging_loss
    from el_fairseq import EncouragingLoss, encouraging_loss      # no fairseq needed
    from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss   # the same, from features + projection

Two halves: the plugin (loss/: the formula, its float64 reference and the fused paths; criterions/:
the fairseq criteria; compat: fairseq 0.12 on recent torch; cli) and the pipeline (pipeline/:
recipes, train, evaluate, reproduce, report), which uses the plugin and is never imported by it.
"""
from .loss.api import EncouragingLoss, encouraging_loss  # noqa: F401  (the public PyTorch loss)
from .loss.linear import EncouragingLinearLoss, encouraging_linear_loss  # noqa: F401  (no logits: fused head)

try:
    import fairseq  # noqa: F401
except ImportError:  # the PyTorch loss works without fairseq; the plugin half needs it
    pass
else:
    from . import compat  # noqa: F401  (torch>=2.6 checkpoint loading, batching fix, one-line option errors)
    from . import criterions  # noqa: F401  (registers the criteria)
