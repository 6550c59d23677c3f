import torch

from normopt.parallel.grad_clip import clip_coefficient, clip_grad_norm_


def _params_with_grads(seed):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    return params


def test_matches_torch_clip_grad_norm():
    ours, ref = _params_with_grads(0), _params_with_grads(0)
    norm = clip_grad_norm_(ours, max_norm=1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0)
    torch.testing.assert_close(norm, ref_norm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_small_gradients_are_untouched_and_zero_disables():
    params = _params_with_grads(1)
    before = [p.grad.clone() for p in params]
    clip_grad_norm_(params, max_norm=1e6)
    clip_grad_norm_(params, max_norm=0)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
    assert clip_coefficient(torch.tensor(0.5), 1.0) == 1.0
