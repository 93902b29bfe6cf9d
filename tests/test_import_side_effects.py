"""Importing the public loss changes nothing outside el_fairseq: fairseq's checkpoint loading, batching
and launcher, torch.load, torch's safe globals and sys.excepthook are the same objects before and
after `import el_fairseq` (fairseq is not even imported by it). The plugin, loaded as fairseq's
--user-dir or through `import el_fairseq.criterions`, is what patches fairseq (el_fairseq.compat)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATE = """
def state():
    import sys, torch
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model
    return {"checkpoint_utils.torch": checkpoint_utils.torch, "checkpoint_utils.torch.load": checkpoint_utils.torch.load,
            "distributed_utils.torch": distributed_utils.torch, "batch_by_size": data_utils.batch_by_size,
            "call_main": distributed_utils.call_main, "ddp": distributed_fairseq_model.DistributedDataParallel,
            "torch.load": torch.load, "safe_globals": tuple(torch.serialization.get_safe_globals()),
            "excepthook": sys.excepthook}

def changed(before, after):
    return sorted(k for k in before if before[k] is not after[k] and before[k] != after[k])
"""


def python(code):
    out = subprocess.run([sys.executable, "-c", STATE + code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_public_loss_imports_no_fairseq_and_changes_no_hook():
    assert python("""
import sys
hook = sys.excepthook
import el_fairseq
from el_fairseq import EncouragingLoss, encouraging_loss
import torch
encouraging_loss(torch.randn(5, 7), torch.tensor([0, 1, 2, 3, 4]))
print(sorted(m for m in sys.modules if m.split('.')[0] in ('fairseq', 'fairseq_cli')), sys.excepthook is hook)
""") == "[] True"


def test_importing_the_public_loss_after_fairseq_patches_nothing():
    # the control: the plugin, imported afterwards in the same process, does patch each of these.
    # torch imports its compiler, torch._dynamo, at the first call of any torch.library custom op (the loss's
    # kernels are ones, as is torch's own linear_cross_entropy); that import adds torch.distributed.tensor's
    # classes to torch's safe globals. torch's own change, made before the state is taken: what is compared is ours.
    assert python("""
import torch._dynamo
before = state()
import torch
import el_fairseq
from el_fairseq import EncouragingLoss, encouraging_loss
EncouragingLoss()(torch.randn(5, 7, requires_grad=True), torch.tensor([0, 1, 2, 3, 4])).backward()
after_loss = state()
import el_fairseq.criterions
print(changed(before, after_loss), changed(before, state()))
""") == ("[] ['batch_by_size', 'call_main', 'checkpoint_utils.torch', 'checkpoint_utils.torch.load', 'ddp', "
         "'distributed_utils.torch', 'excepthook']")


def test_loaded_as_fairseqs_user_dir_the_plugin_patches_and_registers():
    assert python(f"""
import argparse
before = state()
from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY
utils.import_user_module(argparse.Namespace(user_dir={os.path.join(ROOT, 'el_fairseq')!r}))
print('encouraging_loss' in CRITERION_REGISTRY, changed(before, state()))  # not torch's safe globals either
""") == ("True ['batch_by_size', 'call_main', 'checkpoint_utils.torch', 'checkpoint_utils.torch.load', 'ddp', "
         "'distributed_utils.torch', 'excepthook']")
