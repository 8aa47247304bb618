"""Edges of the maths helpers that whole training steps do not reach: Diff's 0/0 rule, an empty half of
the split-half noise, triangle indices and their cache, transport with persistent storage, the KL
clip below an inner product of 1, a convolution's output positions, scheduler state with unknown keys.
Each one was found by mutation testing (docs/TESTING.md)."""

import math

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.factors import (
    TriangleIndices,
    diff_from_squares,
    kl_clip_scale,
    pack,
    packed_numel,
    pi_from_diagonal_means,
    split_half_noise,
    unpack,
)
from kfac_hvd.layers import Conv2dLayer
from kfac_hvd.scheduler import IntervalScheduler
from tests.helpers.direct_factors import forward_backward, make_model, step_inputs
from tests.helpers.mirror_comm import MirrorCommunicator


def test_diff_from_squares_is_the_root_of_the_ratio_and_zero_over_zero_is_zero():
    assert diff_from_squares(4.0, 1.0) == 2.0
    assert diff_from_squares(1.0, 4.0) == 0.5
    assert diff_from_squares(-1e-30, 4.0) == 0.0  # rounding below 0 is no change
    assert diff_from_squares(0.0, 0.0) == 0.0  # a factor that stays zero has not changed
    assert diff_from_squares(1.0, 0.0) == math.inf  # one that leaves zero changed without bound


def test_split_half_noise_of_an_empty_half_is_a_zero_scalar_of_the_factor_dtype():
    full = torch.arange(4.0, dtype=torch.float64).reshape(2, 2)
    for first, second in ((0, 3), (3, 0)):
        noise = split_half_noise(full, first, full + 1, second)
        assert noise.shape == () and noise.dtype == torch.float64 and float(noise) == 0.0


def test_one_sample_batch_has_no_noise_estimate_and_keeps_the_raw_diff():
    """A batch of one sample leaves the first half empty: v = 0, so the noise-aware Diff is Eq. (6)."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model, noise_aware_diff=True)
    for step in (1, 2):
        forward_backward(model, *step_inputs(step, 1, seed=3))
        record = kfac.step()
    for name, state in kfac.layer_state.items():
        kinds = state.noise
        assert kinds and all(value == 0.0 for value in kinds.values()), name
        entry = record["layers"][name]
        for kind in kinds:
            assert entry[f"diff_{kind}"] == entry[f"raw_diff_{kind}"] > 0


def test_triangle_indices_are_row_major_upper_positions():
    indices = TriangleIndices().get(3, torch.device("cpu"))
    assert indices.dtype == torch.int32
    assert indices.tolist() == [0, 1, 2, 4, 5, 8]


def test_triangle_indices_keep_the_least_recently_used_sizes_within_the_budget():
    """int32 indices: n(n+1)/2 · 4 bytes, so sizes 3, 4, 5 take 24, 40 and 60 bytes."""
    cpu = torch.device("cpu")
    cache = TriangleIndices(budget_bytes=84)
    first = cache.get(3, cpu)
    cache.get(4, cpu)
    assert cache.get(3, cpu) is first and cache.nbytes() == 64  # kept, and now the most recent
    cache.get(5, cpu)  # 124 > 84: size 4 goes, 3 and 5 stay
    assert cache.nbytes() == 84
    assert cache.get(3, cpu) is first
    tiny = TriangleIndices(budget_bytes=1)  # over budget, the newest is still kept
    tiny.get(3, cpu)
    tiny.get(4, cpu)
    assert tiny.nbytes() == 40


@pytest.mark.parametrize("shape", [(5, 5), (3, 2, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_and_unpack_round_trip_into_given_storage(shape, symmetric):
    entries = torch.randn(shape, dtype=torch.float64)
    matrix = entries + entries.mT  # exactly symmetric
    flat = pack(matrix, symmetric)
    assert flat.shape == (packed_numel(shape, symmetric),)
    out = torch.full_like(flat, float("nan"))
    assert pack(matrix, symmetric, out=out) is out and torch.equal(out, flat)
    target = torch.full(shape, float("nan"), dtype=torch.float64)
    assert unpack(flat, shape, symmetric, out=target) is target
    assert torch.equal(target, matrix) and torch.equal(unpack(flat, shape, symmetric), matrix)


@pytest.mark.parametrize("symmetric", [True, False])
def test_transported_factors_are_unpacked_into_the_storage_they_already_have(symmetric):
    """X_pre's storage is reused from the second update on: no new factor-sized tensor per step. While
    the factors travel, the exchange holds their packed buffers (fp64; no noise value)."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model, comm=MirrorCommunicator(), symmetric_comm=symmetric)
    shapes = {name: layer.factor_shapes() for name, layer in kfac.layers.items()}
    in_flight = 8 * sum(
        packed_numel(shape, symmetric) for kinds in shapes.values() for shape in kinds.values()
    )
    storage = []
    for step in (1, 2, 3):
        forward_backward(model, *step_inputs(step, 6, seed=4))
        assert kfac.memory_bytes()["communication_buffers"] == in_flight
        kfac.step()
        assert kfac.memory_bytes()["communication_buffers"] == 0
        storage.append(
            {
                (name, kind): factor.data_ptr()
                for name, kinds in kfac.previous.items()
                for kind, factor in kinds.items()
            }
        )
    assert storage[1] == storage[2]


def test_pi_is_one_unless_both_traces_are_positive_and_their_ratio_finite():
    assert pi_from_diagonal_means(0.5, 2.0) == 0.5
    assert pi_from_diagonal_means(0.0, 1.0) == 1.0
    assert pi_from_diagonal_means(1.0, 0.0) == 1.0
    assert pi_from_diagonal_means(1e300, 1e-300) == 1.0  # the ratio overflows


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("threshold", [1e9, None])
def test_inverses_and_intervals_travel_in_the_allgather_and_change_nothing(symmetric, threshold):
    """local_inverse_max_dim=20: the linear layer (A 49×49) is the one layer not inverted everywhere, so
    rank 0 owns it and the allgather carries its inverses, and with λ rank 0's intervals (every Diff
    below λ: due at steps 1, 2, 4, 6). The gradients equal those of one process on the same batches;
    the counters hold what was handed to the collectives (fp64)."""
    options = dict(update_threshold=threshold, local_inverse_max_dim=20, symmetric_comm=symmetric)
    travelling, alone = make_model(), make_model()
    kfac = kfac_hvd.KFAC(travelling, comm=MirrorCommunicator(), **options)
    reference = kfac_hvd.KFAC(alone, **options)
    assert kfac.assignment.owner == {"fc": 0}
    due = []
    for step in range(1, 7):
        for model, k in ((travelling, kfac), (alone, reference)):
            forward_backward(model, *step_inputs(2 if step % 2 else 1, 6, seed=step))
            record = k.step()
        due.append(record["layers"]["fc"]["due"])
        if record["layers"]["fc"]["due"]:
            assert record["factor_allreduces_started"] == {"hooks": 5, "step": 0}
        for p, q in zip(travelling.parameters(), alone.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=0)
    updates = 4 if threshold else 6
    assert due == ([True, True, False, True, False, True] if threshold else [True] * 6)
    assert (
        kfac.scheduler.interval
        == reference.scheduler.interval
        == {name: 4 if threshold else 1 for name in ("conv", "bn", "fc")}
    )
    stats = kfac.comm_stats()
    assert stats["control_payload_bytes"] == (updates * 3 * 8 if threshold else 0)  # 3 intervals per update
    shapes = {name: layer.factor_shapes() for name, layer in kfac.layers.items()}
    for name, kinds in shapes.items():
        for kind, shape in kinds.items():
            sent = stats["per_layer"][name][kind]
            assert sent["count"] == updates and sent["payload_bytes"] == updates * 8 * packed_numel(
                shape, symmetric
            )
            inverse = stats["per_layer"][name].get(f"{kind}_inv")
            if name == "fc":
                assert inverse["count"] == updates
                assert inverse["payload_bytes"] == updates * 8 * packed_numel(shape, symmetric)
            else:
                assert inverse is None
    dense = sum(math.prod(shape) for kinds in shapes.values() for shape in kinds.values()) + sum(
        math.prod(shape) for shape in shapes["fc"].values()
    )
    assert stats["dense_payload_bytes"] == updates * 8 * dense


def test_ranks_that_disagree_on_the_allgather_layout_get_a_clear_error():
    """With every layer owned by some rank, rank 1's inverses are missing from what arrives."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model, comm=MirrorCommunicator(), local_inverse_max_dim=0)
    forward_backward(model, *step_inputs(1, 6, seed=6))
    with pytest.raises(RuntimeError, match="ranks disagree on the due layers or their owners$"):
        kfac.step()


def test_a_factor_started_twice_in_one_step_is_refused():
    from kfac_hvd.comm import LocalCommunicator, TrafficCounter
    from kfac_hvd.exchange import FactorExchange

    exchange = FactorExchange(LocalCommunicator(), TrafficCounter(1), symmetric=True)
    exchange.start("fc", "A", torch.eye(2))
    with pytest.raises(RuntimeError, match="factor A of layer 'fc' was started twice"):
        exchange.start("fc", "A", torch.eye(2))


def test_kl_clip_scale_below_an_inner_product_of_one():
    """lr² ⟨v, g⟩ = 0.25·1 and c = 0.01: ν = sqrt(0.01/0.25) = 0.2 (and 1 when the sum is not positive)."""
    gradients = {"layer": torch.tensor([[1.0, 0.0]])}
    scale = kl_clip_scale({"layer": torch.tensor([[1.0, 3.0]])}, gradients, 0.01, 0.5)
    assert float(scale) == pytest.approx(0.2)
    assert float(kl_clip_scale({"layer": torch.tensor([[-1.0, 3.0]])}, gradients, 0.01, 0.5)) == 1.0


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(2, 1)),
        dict(kernel_size=(1, 3), stride=(1, 3), padding=(1, 0)),
        dict(kernel_size=1, stride=(2, 1)),
    ],
)
def test_conv_positions_are_the_output_pixels(options):
    """One unfolded patch per output pixel (strided, dilated, and 1×1 without unfold), and the chunk
    budget counts as many."""
    conv = nn.Conv2d(2, 3, **options)
    x = torch.randn(1, 2, 9, 11)
    layer = Conv2dLayer("conv", conv, torch.float32)
    pixels = conv(x)[0, 0].numel()
    assert layer._positions(x) == pixels
    assert layer._input_columns(x).shape == (1, layer.a_dim - 1, pixels)


def test_inversion_costs_are_the_cubes_of_the_factor_sizes():
    """What the owner assignment balances: dim(A)³ + dim(G)³, and 8 per BatchNorm channel."""
    from kfac_hvd.layers import BatchNormLayer, LinearLayer

    assert LinearLayer("fc", nn.Linear(4, 3), torch.float32).inversion_cost() == 5**3 + 3**3
    assert BatchNormLayer("bn", nn.BatchNorm2d(3), torch.float32).inversion_cost() == 24


def test_batchnorm_fisher_in_chunks_equals_one_pass():
    from kfac_hvd.layers import BatchNormLayer

    layer = BatchNormLayer("bn", nn.BatchNorm2d(3), torch.float64)
    x, grad = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    whole, samples = layer.f_contribution(x, grad, chunk_bytes=1 << 30)
    chunked, _ = layer.f_contribution(x, grad, chunk_bytes=1)  # one sample at a time
    assert samples == 5
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)


def test_scheduler_state_naming_unknown_keys_is_refused_with_three_of_them():
    scheduler = IntervalScheduler(["a"])
    state = {"interval": {"a": 2, "w": 1, "x": 1, "y": 1, "z": 1}, "last_update": {"a": 1}}
    with pytest.raises(ValueError, match=r"does not have: \['w', 'x', 'y'\]$"):
        scheduler.load_state_dict(state)
    assert scheduler.interval == {"a": 1}


def test_scheduler_bounds_are_inclusive():
    """max_interval=1 is allowed (it pins every interval at 1); a Diff exactly m·λ halves the interval,
    which never falls below 1 and stays an int."""
    pinned = IntervalScheduler(["a"], update_threshold=0.25, max_interval=1)
    assert pinned.record("a", 2, 0.0) == 1
    scheduler = IntervalScheduler(["a"], update_threshold=0.25, shrink_multiple=2.0, initial_interval=3)
    assert scheduler.state_dict() == {"interval": {"a": 3}, "last_update": {"a": 0}}
    halved = scheduler.record("a", 3, 0.5)
    assert halved == 1 and isinstance(halved, int)
    assert scheduler.record("a", 4, 0.5) == 1


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_batchnorm_blocks_are_inverted_block_by_block(method):
    """BatchNorm's (C, 2, 2) blocks through a whole step: ĝ_c = (F_c + γI)⁻¹ g_c with F from the
    direct computation."""
    from tests.helpers.direct_factors import direct_factors

    damping = 1e-2
    model = make_model()
    kfac = kfac_hvd.KFAC(model, damping=damping, inverse_method=method)
    seen = forward_backward(model, *step_inputs(1, 6, seed=5))
    gradient = torch.stack([model.bn.weight.grad, model.bn.bias.grad], dim=1).clone()
    kfac.step()
    blocks = direct_factors(model, seen)[("bn", "F")] + damping * torch.eye(2, dtype=torch.float64)
    expected = torch.linalg.solve(blocks, gradient.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(
        torch.stack([model.bn.weight.grad, model.bn.bias.grad], dim=1), expected, rtol=1e-9, atol=1e-12
    )


def test_an_eval_mode_pass_captures_nothing():
    """Validation between two training steps, with autograd on: the armed layers' hooks skip it, so the
    training pass that follows is the step's one pass."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model)
    model.eval()
    forward_backward(model, *step_inputs(1, 6, seed=7))
    model.train()
    forward_backward(model, *step_inputs(1, 6, seed=7))
    assert kfac.step()["factor_allreduces_started"] == {"hooks": 5, "step": 0}


def test_a_layer_armed_for_a_alone_captures_no_g():
    model = make_model()
    kfac = kfac_hvd.KFAC(model)
    kfac.capture.arm({"fc": ["A"]})
    forward_backward(model, *step_inputs(1, 6, seed=8))
    assert kfac.capture.handed_over == {("fc", "A")}
