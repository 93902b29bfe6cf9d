"""The fused paths on a real CUDA device (skipped without one; `make gpu-check` runs them with
`-m cuda` and counts a skip as a failure). The same properties the CPU tests check under Triton's
interpreter: agreement with the float64 reference, the first-use self-check passing on the real
kernel, torch's cross-entropy with the bonus off, and no gradient work under no_grad (fp16
gradients after fairseq's loss scale: test_loss.py, on CUDA too)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import encouraging_linear_loss
from el_fairseq import encouraging_loss as public_loss
from el_fairseq.loss import dispatch, self_check
from el_fairseq.loss.bonus import BonusSpec
from test_loss import PAD, make_batch, run_ref64

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("fresh_kernel_state")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_is_triton_and_its_self_check_passes(dtype):
    logits, target = make_batch(200, 5003, 6.0, seed=7, pad_rows=9)
    z = logits.to(dtype).cuda().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns: here it must not
        loss, _ = dispatch.encouraging_loss(z, target.cuda(), 0.1, BonusSpec(), ignore_index=PAD, impl="auto")
        loss.backward()
    assert dispatch.path_for(z, "auto") == "triton"
    assert self_check._results[("triton", dtype, "cuda")] == (True, "")
    want = run_ref64(logits.to(dtype).double(), target, 0.1, BonusSpec())
    assert torch.allclose(loss.double().cpu(), want[0], rtol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_api_bonus_off_is_torch_cross_entropy(reduction):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(50, 300, 7, generator=g) * 3).cuda()
    y = torch.randint(0, 300, (50, 7), generator=g).cuda()
    y[:5, 0] = -100
    got = public_loss(x, y, bonus_rho=0.0, label_smoothing=0.1, reduction=reduction, impl="triton")
    want = F.cross_entropy(x, y, label_smoothing=0.1, reduction=reduction)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_grad_allocates_no_gradient():
    logits, target = make_batch(2048, 10000, 4.0, seed=5, pad_rows=20)
    z, t = logits.cuda(), target.cuda()
    dispatch.encouraging_loss(z, t, 0.1, BonusSpec(), ignore_index=PAD, impl="triton")  # compile + self-check
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        loss, _ = dispatch.encouraging_loss(z, t, 0.1, BonusSpec(), ignore_index=PAD, impl="triton")
    # a gradient of the logits' size would be 2048 x 10000 x 4 bytes = 78 MiB
    assert torch.cuda.max_memory_allocated() - base < z.numel() * z.element_size() // 4
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_autocast_as_torchs_cross_entropy(dtype, reduction):
    """Under CUDA autocast (issue 25): the Triton path (logits in) and the fused linear loss return a
    float32 loss equal to torch's autocast cross-entropy within 16-bit tolerances, gradients finite."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g).cuda().requires_grad_(True)
    w = (torch.randn(5003, 64, generator=g) * 0.3).cuda().requires_grad_(True)
    y = torch.randint(0, 5003, (300,), generator=g).cuda()
    y[:7] = -100
    with torch.autocast("cuda", dtype=dtype):
        z = F.linear(x, w)
        want = F.cross_entropy(z, y, reduction=reduction)
        got = public_loss(z, y, reduction=reduction, bonus_rho=0.0)
        fused = encouraging_linear_loss(x, w, y, reduction=reduction, bonus_rho=0.0)
    assert got.dtype == fused.dtype == want.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fused, want, rtol=2e-2, atol=2e-2)
    (got.sum() + fused.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
