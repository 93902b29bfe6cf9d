"""el-fairseq: the encouraging loss (Zhao et al., arXiv 2110.06537) as a fairseq user-dir plugin, and
for any PyTorch model.

    fairseq-train ... --user-dir $(el-fairseq-user-dir) --criterion encouraging_loss
    from el_fairseq import EncouragingLoss, encouraging_loss      # no fairseq needed
    from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss   # the same, from features + projection

Two halves: the plugin (loss/: the formula, its float64 reference and the fused paths; criterions/:
the fairseq criteria; compat: fairseq 0.12 on recent torch; cli) and the pipeline (pipeline/:
recipes, train, evaluate, reproduce, report), which uses the plugin and is never imported by it.
"""
import os
import sys

from .loss.api import EncouragingLoss, encouraging_loss  # noqa: F401  (the public PyTorch loss)
from .loss.linear import EncouragingLinearLoss, encouraging_linear_loss  # noqa: F401  (no logits: fused head)


def _loaded_as_fairseq_user_dir():
    """fairseq loads a --user-dir (fairseq.utils.import_user_module, also behind from_pretrained(user_dir=...))
    by noting its path in import_user_module.memo, then importing it: this package, loaded that way."""
    utils = sys.modules.get("fairseq.utils")
    memo = getattr(getattr(utils, "import_user_module", None), "memo", ())
    here = os.path.realpath(os.path.dirname(__file__))
    return any(os.path.realpath(p) == here for p in memo)


# The plugin half (the criteria, and el_fairseq.compat's patches of fairseq) loads only as fairseq's
# --user-dir or through `import el_fairseq.criterions`: importing the public loss changes nothing outside it.
if _loaded_as_fairseq_user_dir():
    from . import criterions  # noqa: F401
