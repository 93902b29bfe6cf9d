"""el-fairseq: the encouraging loss (Zhao et al., arXiv 2110.06537) as a fairseq user-dir plugin.

    fairseq-train ... --user-dir $(el-fairseq-user-dir) --criterion encouraging_loss
"""
from . import compat  # noqa: F401  (torch>=2.6 checkpoint loading, one-line option errors)
from . import criterions  # noqa: F401  (registers the criteria)
