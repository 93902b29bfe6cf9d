"""fairseq-preprocess into a data-bin folder (written under a temporary name, then renamed)."""
import os
import shutil
import subprocess
import sys

from .common import PrepError


def fairseq_preprocess(text_dir, src, tgt, dest, workers=1, joined=False, tests=("test",)):
    """fairseq-preprocess of TEXT_DIR/{train,valid,TESTS...}.{src,tgt}: the tests become fairseq's subsets
    test, test1, ... in the order given."""
    tool = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    cmd = [tool] if os.path.exists(tool) else [sys.executable, "-m", "fairseq_cli.preprocess"]
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd += ["--source-lang", src, "--target-lang", tgt, "--trainpref", os.path.join(text_dir, "train"),
            "--validpref", os.path.join(text_dir, "valid"), "--testpref", ",".join(os.path.join(text_dir, t) for t in tests),
            "--destdir", tmp, "--workers", str(workers)]
    if joined:
        cmd.append("--joined-dictionary")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepError(f"fairseq-preprocess failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
