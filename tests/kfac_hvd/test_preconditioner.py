"""KFAC in one process: registration, options, the not-due path, state, accounting."""

import copy
import math

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.assignment import assign_layers
from tests.helpers.models import batches, small_cnn


def train(model, kfac, data, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    records = []
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        records.append(kfac.step(lr=lr))
        optimizer.step()
    return records, optimizer


def test_resnet50_registers_107_layers_and_options_leave_layers_to_sgd():
    from torchvision.models import resnet50

    model = resnet50()
    names = kfac_hvd.KFAC(model).layer_names
    assert len(names) == 107
    assert sum(isinstance(model.get_submodule(n), nn.BatchNorm2d) for n in names) == 53
    assert sum(isinstance(model.get_submodule(n), nn.Conv2d) for n in names) == 53
    assert len(kfac_hvd.KFAC(resnet50(), include_batchnorm=False).layer_names) == 54
    skipped = kfac_hvd.KFAC(resnet50(), skip_layers=[r"^fc$", r"^layer4\."]).layer_names
    assert "fc" not in skipped and not any(n.startswith("layer4.") for n in skipped)


def test_unknown_keyword_and_bad_values_raise():
    with pytest.raises(TypeError):
        kfac_hvd.KFAC(small_cnn(), update_treshold=0.25)
    for bad in (
        {"damping": 0},
        {"update_threshold": -0.1},
        {"interval_policy": "sometimes"},
        {"inverse_method": "lu"},
        {"factor_decay": 1.0},
        {"kl_clip": 0},
    ):
        with pytest.raises(ValueError):
            kfac_hvd.KFAC(small_cnn(), **bad)


def test_factors_are_fp32_for_bf16_model():
    model = small_cnn().to(torch.bfloat16)
    kfac = kfac_hvd.KFAC(model)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
    kfac.step()
    assert all(t.dtype == torch.float32 for kinds in kfac.factors.values() for t in kinds.values())
    assert model[0].weight.grad.dtype == torch.bfloat16


def test_layers_not_due_do_no_factor_work_and_keep_their_inverse():
    torch.manual_seed(0)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model, update_threshold=1e9)  # every diff is below λ: intervals grow
    calls = {"A": 0, "G": 0}
    for layer in kfac.layers.values():
        if hasattr(layer, "a_contribution"):
            original_a, original_g = layer.a_contribution, layer.g_contribution
            layer.a_contribution = lambda x, f=original_a, **kw: (
                calls.__setitem__("A", calls["A"] + 1),
                f(x, **kw),
            )[1]
            layer.g_contribution = lambda g, f=original_g, **kw: (
                calls.__setitem__("G", calls["G"] + 1),
                f(g, **kw),
            )[1]
    data = batches(6)
    records, _ = train(model, kfac, data[:2])
    assert [r["step"] for r in records] == [1, 2]
    assert all(entry["interval"] == 2 for entry in records[-1]["layers"].values())
    inverse_before = kfac.inverses["0"]["A"].clone()
    calls.update(A=0, G=0)
    record = train(model, kfac, data[2:3])[0][0]  # step 3: 3 mod 2 != 0, nothing due
    assert calls == {"A": 0, "G": 0}
    assert not any(entry["due"] for entry in record["layers"].values())
    assert torch.equal(kfac.inverses["0"]["A"], inverse_before)
    assert model[0].weight.grad is not None  # still preconditioned
    record = train(model, kfac, data[3:4])[0][0]  # step 4: due again
    assert all(entry["due"] for entry in record["layers"].values())
    assert calls == {"A": 3, "G": 3}  # the three Kronecker layers


def test_eval_forward_captures_nothing():
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model)
    with torch.no_grad():
        model(batches(1)[0][0])
    model.eval()
    model(batches(1)[0][0])
    assert not kfac.capture.sums


def test_state_dict_resume_continues_exactly():
    torch.manual_seed(1)
    data = batches(12, seed=3)
    options = dict(update_threshold=0.3, interval_policy="since_last", factor_decay=0.5)
    model = small_cnn()
    reference_model = copy.deepcopy(model)
    reference = kfac_hvd.KFAC(reference_model, **options)
    reference_records, _ = train(reference_model, reference, data)

    kfac = kfac_hvd.KFAC(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    head = []
    for x, y in data[:7]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        head.append(kfac.step(lr=0.05))
        optimizer.step()
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "kfac": kfac.state_dict()}
    )

    resumed_model = small_cnn()
    resumed_model.load_state_dict(saved["model"])
    resumed = kfac_hvd.KFAC(resumed_model, **options)
    resumed.load_state_dict(saved["kfac"])
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(saved["opt"])
    tail = []
    for x, y in data[7:]:
        resumed_optimizer.zero_grad()
        nn.functional.cross_entropy(resumed_model(x), y).backward()
        tail.append(resumed.step(lr=0.05))
        resumed_optimizer.step()

    def schedule(records):
        return [(r["step"], {n: (e["due"], e["interval"]) for n, e in r["layers"].items()}) for r in records]

    assert schedule(head + tail) == schedule(reference_records)
    assert any(not e["due"] for r in reference_records for e in r["layers"].values())  # schedule did skip
    for p, q in zip(resumed_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)


def test_load_state_dict_rejects_other_model():
    kfac = kfac_hvd.KFAC(small_cnn())
    other = kfac_hvd.KFAC(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError):
        kfac.load_state_dict(other.state_dict())


def test_separate_intervals_track_a_and_g_on_their_own():
    """One linear layer fed the same inputs every step (A never changes) with new targets every step
    (G changes): A's interval grows as the rule says, G's stays 1."""
    torch.manual_seed(2)
    model = nn.Linear(6, 4)
    kfac = kfac_hvd.KFAC(model, update_threshold=0.05, separate_intervals=True)
    x = torch.randn(32, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    records = []
    for _ in range(12):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), torch.randn(32, 4)).backward()
        records.append(kfac.step())
        optimizer.step()
    assert kfac.scheduler.keys == [":A", ":G"]
    assert [r["layers"][""]["diff_G"] is None or r["layers"][""]["diff_G"] > 0.05 for r in records] == [
        True
    ] * 12
    # modulo with every diff of A below λ: A due at 1, 2, 4, 6, 8, 10, 12 and its interval 1, 2, 3, …, 7
    assert [r["layers"][""]["diff_A"] is not None for r in records] == [
        s in (2, 4, 6, 8, 10, 12) for s in range(1, 13)
    ]
    assert records[-1]["layers"][""]["intervals"] == {"A": 7, "G": 1}


def test_kl_clip_scales_the_update_and_needs_lr():
    """ν = min(1, sqrt(c / (lr² Σ⟨ΔW, ∇W⟩))) over every preconditioned parameter, computed here from the
    raw gradients and the unclipped preconditioned ones."""
    torch.manual_seed(3)
    x, y = batches(1)[0]
    lr = 0.5
    original = small_cnn()
    plain_model = copy.deepcopy(original)
    plain = kfac_hvd.KFAC(plain_model)
    nn.functional.cross_entropy(plain_model(x), y).backward()
    raw = [p.grad.clone() for p in plain_model.parameters()]
    plain.step(lr=lr)
    inner = sum(float((p.grad * g).sum()) for p, g in zip(plain_model.parameters(), raw))
    assert inner > 0
    for target, kl_clip in ((0.5, 0.25 * lr**2 * inner), (1.0, 4 * lr**2 * inner)):
        clipped_model = copy.deepcopy(original)
        clipped = kfac_hvd.KFAC(clipped_model, kl_clip=kl_clip)
        nn.functional.cross_entropy(clipped_model(x), y).backward()
        with pytest.raises(ValueError, match="lr"):
            clipped.step()  # refused before anything is consumed
        record = clipped.step(lr=lr)
        expected = min(1.0, math.sqrt(kl_clip / (lr**2 * inner)))
        assert expected == pytest.approx(target)
        assert float(record["kl_scale"]) == pytest.approx(expected, rel=1e-5)
        for p, q in zip(clipped_model.parameters(), plain_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad * expected)


def test_compute_accounting_counts_only_due_factors():
    torch.manual_seed(4)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model, update_threshold=1e9)
    train(model, kfac, batches(8))
    stats = kfac.comm_stats()
    per_step = stats["every_step_elements"] / 8
    # due steps 1, 2, 4, 6, 8: five of eight
    assert stats["computed_elements"] == pytest.approx(5 * per_step)
    assert stats["compute_ratio"] == pytest.approx(5 / 8)
    assert stats["payload_bytes"] == 0  # one process: nothing handed to Horovod


def test_assignment_is_greedy_by_cost():
    assignment = assign_layers({"a": 10, "b": 7, "c": 5, "d": 4, "e": 1}, 2)
    # 10 -> r0; 7 -> r1; 5 -> r1 (7<10); 4 -> r0 (10<12); 1 -> r1 (12<14)... r0=14, r1=12 -> e to r1
    assert assignment.owner == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert assignment.load == [14, 13]
    assert assignment.imbalance == pytest.approx(14 / 13.5)
    many = assign_layers({"a": 1.0}, 4)
    assert many.load == [1.0, 0, 0, 0] and many.imbalance == pytest.approx(4.0)


def test_resnet50_assignment_over_128_ranks_uses_107_ranks_at_most():
    from torchvision.models import resnet50

    kfac = kfac_hvd.KFAC(resnet50())
    assignment = assign_layers(kfac.inversion_costs(), 128)
    assert sum(load > 0 for load in assignment.load) == 107
    assert assignment.imbalance > 1


def test_grouped_and_string_padding_convolutions_stay_on_the_plain_gradient():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Conv2d(4, 2, 1),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 3),
    )
    kfac = kfac_hvd.KFAC(model)
    assert kfac.layer_names == ["2", "4"]
    nn.functional.cross_entropy(model(torch.randn(8, 2, 8, 8)), torch.randint(0, 3, (8,))).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    kfac.step()
    for index, (p, g) in enumerate(zip(model.parameters(), plain)):
        left_alone = index < 4  # weights and biases of the first two convolutions
        assert torch.equal(p.grad, g) == left_alone, index


def test_remove_hooks_detaches_from_the_model():
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model)
    kfac.remove_hooks()
    assert not any(module._forward_hooks for module in model.modules())
    nn.functional.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    assert kfac.capture.sums == {} and kfac.exchange.started_from == {"hooks": 0, "step": 0}
    with pytest.raises(RuntimeError, match="captured no"):
        kfac.step()


def test_factor_decay_is_a_running_average_of_the_fresh_factors():
    """factor ← d·factor + (1 − d)·fresh, starting from the first fresh factor; X_pre is the fresh one."""
    torch.manual_seed(6)
    model = small_cnn().double()
    kfac = kfac_hvd.KFAC(model, factor_decay=0.25)
    fresh = []
    for x, y in batches(3, seed=7):
        model.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        kfac.step()
        fresh.append({kind: t.clone() for kind, t in kfac.previous["3"].items()})
    assert not torch.allclose(fresh[0]["A"], fresh[2]["A"])
    for kind in ("A", "G"):
        expected = 0.25 * (0.25 * fresh[0][kind] + 0.75 * fresh[1][kind]) + 0.75 * fresh[2][kind]
        torch.testing.assert_close(kfac.factors["3"][kind], expected)
    means = {kind: float(torch.diagonal(kfac.factors["3"][kind]).mean()) for kind in ("A", "G")}
    assert kfac.layer_state["3"].diagonal_means == pytest.approx(means)  # π follows the running factors
