"""DBiLD reference (the values of docs/method.md), its properties, and the baselines."""
import pytest
import torch

from recipe.losses import bild_loss, dbild_loss, kl_loss
from recipe.losses.dbild import dbild_branches_torch, knee_k

R = [6.0, 5.5, 5.0, 1.0, 0.8, 0.5, 0.2, 0.0]
Q = [2.0, 3.0, 1.5, 0.0, 2.5, 0.2, 0.1, 1.0]
METHOD_EXAMPLE_GRAD_TAU1 = [-0.86801903, -0.08102676, -1.03468969, 0.34615624, 1.00872484, 0.15174168, 0.0, 0.47711272]


def spec_inputs():
    ref = torch.tensor([R], dtype=torch.float64)
    trainee = torch.tensor([Q], dtype=torch.float64, requires_grad=True)
    return ref, trainee


@pytest.mark.parametrize("tau, l_t, l_s, total", [
    (1.0, 0.4805803407, 2.0401138353, 2.5206941760),
    (3.0, 0.0884825021, 0.4477111719, 0.5361936740),
])
def test_spec_reference_values(tau, l_t, l_s, total):
    ref, trainee = spec_inputs()
    parts = dbild_branches_torch(ref, trainee, candidates=8, k_min=2, k_max=8, temperature=tau)
    assert parts["ref_led_k"].tolist() == [4] and parts["trainee_led_k"].tolist() == [6]
    assert parts["ref_led_loss"].item() == pytest.approx(l_t, abs=1e-9)
    assert parts["trainee_led_loss"].item() == pytest.approx(l_s, abs=1e-9)
    loss = dbild_loss(ref, trainee, candidates=8, k_min=2, k_max=8, temperature=tau, impl="torch")
    assert loss.item() == pytest.approx(total, abs=1e-9)


def test_spec_reference_gradient():
    ref, trainee = spec_inputs()
    dbild_loss(ref, trainee, candidates=8, temperature=1.0, impl="torch").backward()
    assert torch.allclose(trainee.grad[0], torch.tensor(METHOD_EXAMPLE_GRAD_TAU1, dtype=torch.float64), atol=1e-8)


def test_identical_inputs_give_exactly_zero_and_random_inputs_nonnegative():
    torch.manual_seed(0)
    x = torch.randn(16, 50)
    assert dbild_loss(x, x.clone(), candidates=16, impl="torch").item() == 0.0
    for _ in range(5):
        ref, trainee = torch.randn(32, 200) * 3, torch.randn(32, 200) * 3
        parts = dbild_branches_torch(ref, trainee, candidates=32, temperature=2.0)
        assert (parts["ref_led_loss"] >= 0).all() and (parts["trainee_led_loss"] >= 0).all()


def test_gradcheck_float64():
    torch.manual_seed(1)
    ref = torch.randn(5, 12, dtype=torch.float64)
    trainee = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q: dbild_loss(ref, q, candidates=12, temperature=1.5, impl="torch"), (trainee,))
    assert torch.autograd.gradcheck(
        lambda q: dbild_loss(ref, q, candidates=6, k_max=4, temperature=3.0, impl="torch"), (trainee,))


@pytest.mark.parametrize("gap", [1e2, 1e4, 1e8])
def test_large_logit_gaps_keep_float32_precision(gap):
    """Pair log-probabilities must not round to ulp(largest difference): with three tied leaders far above
    the rest, `d - logsumexp(d)` lost log 3 on the leading pairs and the loss came out ~3x too large."""
    r = torch.tensor([[0.4, -1.2, 0.9, 1.5, 0.0, -0.3, 0.2, 0.7]])
    q = torch.tensor([[gap, gap, gap, 0.5, -0.2, 0.1, -0.5, 0.0]])
    ours = dbild_branches_torch(r, q, candidates=8, temperature=1.0)
    exact = dbild_branches_torch(r.double(), q.double(), candidates=8, temperature=1.0)
    for name in ("ref_led_loss", "trainee_led_loss"):
        assert ours[name].item() == pytest.approx(exact[name].item(), rel=1e-6), name
    g = torch.Generator().manual_seed(0)
    r, q = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g) * gap
    want = dbild_loss(r.double(), q.double(), candidates=16).item()
    assert dbild_loss(r, q, candidates=16).item() == pytest.approx(want, rel=1e-6)


def test_no_nan_gradient_when_every_pair_difference_is_far_below_zero():
    # The ref-led window (indices 0, 1) has one pair, whose trainee difference is -200. Masked entries (0)
    # minus that log-normaliser overflowed exp, and the masking where's backward gave 0 * inf = NaN.
    r = torch.tensor([[2.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 200.0, 0.0]], requires_grad=True)
    loss = dbild_loss(r, q, candidates=3, k_max=2, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def test_no_nan_with_full_vocab_window_minimal_k_and_ties():
    ref = torch.tensor([[1.0] * 8, [5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0], R])
    trainee = torch.tensor([[2.0] * 8, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], Q], requires_grad=True)
    parts = dbild_branches_torch(ref, trainee, candidates=8, k_min=2, k_max=8, temperature=1.0)
    assert parts["ref_led_k"][0].item() == 2  # a flat window gives knee 0, k = k_min
    loss = dbild_loss(ref, trainee, candidates=8, temperature=1.0, impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(trainee.grad).all()


def test_knee_orientation_steep_row_gets_smaller_k_than_flat_row():
    positions = torch.arange(64, dtype=torch.float32)
    steep = 10.0 * torch.exp(-positions / 2.0)  # confident: mass in a few logits
    flat = 10.0 - 0.1 * positions - 5.0 * (positions > 40).float()  # uncertain: long plateau
    k = knee_k(torch.stack([steep, flat]), k_min=2, k_max=64)
    assert k[0] < k[1]
    assert k[0].item() <= 8 and k[1].item() >= 30


def test_gradient_touches_at_most_two_k_max_entries_per_row():
    torch.manual_seed(2)
    ref, trainee = torch.randn(6, 300), torch.randn(6, 300, requires_grad=True)
    dbild_loss(ref, trainee, candidates=64, k_max=10, temperature=3.0, impl="torch").backward()
    assert ((trainee.grad != 0).sum(-1) <= 20).all()


def test_zero_rows_and_bad_shapes():
    trainee = torch.zeros(0, 10, requires_grad=True)
    loss = dbild_loss(torch.zeros(0, 10), trainee, candidates=8, impl="torch")
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="one shape"):
        dbild_loss(torch.zeros(3, 10), torch.zeros(3, 11), impl="torch")
    with pytest.raises(ValueError, match="impl"):
        dbild_loss(torch.zeros(3, 10), torch.zeros(3, 10), impl="cuda")


def test_kl_baseline_matches_manual_formula():
    torch.manual_seed(3)
    ref, trainee = torch.randn(4, 30), torch.randn(4, 30, requires_grad=True)
    tau = 2.0
    p = torch.softmax(ref / tau, -1)
    manual = (p * (p.log() - torch.log_softmax(trainee / tau, -1))).sum(-1).mean() * tau ** 2
    assert kl_loss(ref, trainee, temperature=tau, chunk_rows=3).item() == pytest.approx(manual.item(), rel=1e-5)
    assert kl_loss(ref, ref.clone(), temperature=tau).item() == pytest.approx(0.0, abs=1e-6)


def test_bild_baseline_is_forward_kl_on_fixed_top8_pairs():
    torch.manual_seed(4)
    ref, trainee = torch.randn(3, 40), torch.randn(3, 40)
    assert bild_loss(ref, ref.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # Hand-computed teacher-led branch for one row: all 28 pairs of the teacher's top-8 indices.
    idx = torch.argsort(ref[0], descending=True)[:8]
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]

    def pair_log_softmax(z):
        return torch.log_softmax(torch.stack([(z[idx[i]] - z[idx[j]]) / 3.0 for i, j in pairs]), 0)

    lp, lq = pair_log_softmax(ref[0]), pair_log_softmax(trainee[0])
    teacher_led = (lp.exp() * (lp - lq)).sum()
    idx = torch.argsort(trainee[0], descending=True)[:8]
    lp, lq = pair_log_softmax(ref[0]), pair_log_softmax(trainee[0])
    student_led = (lp.exp() * (lp - lq)).sum()
    got = bild_loss(ref[:1], trainee[:1], top_k=8, temperature=3.0)
    assert got.item() == pytest.approx((teacher_led + student_led).item(), rel=1e-5)
