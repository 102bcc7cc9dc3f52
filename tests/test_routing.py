"""Pins the routing mask tables of models/routing.py against the paper and the released code."""
import math

import pytest
import torch

from models import DiT
from models.routing import (ROUTING_KINDS, TaskRouter, active_channels, build_masks, check_routing_covers,
                            check_timesteps)

T, C = 1000, 64


def window_bounds(row):
    """(start, end) of the ones in a 0/1 row, asserting they are contiguous."""
    idx = row.nonzero().flatten()
    start, end = int(idx[0]), int(idx[-1]) + 1
    assert len(idx) == end - start, "active channels are not contiguous"
    return start, end


@pytest.mark.parametrize("kind", ["dtr", "random", "cdtr"])
@pytest.mark.parametrize("beta", [0.5, 0.8, 0.93])
def test_rows_activate_floor_beta_c_channels(kind, beta):
    masks = build_masks(kind, T, C, alpha=4.0, beta=beta)
    assert masks.shape == (T, C)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.sum(1) == math.floor(beta * C)).all()


def test_dtr_window_is_contiguous_and_slides_monotonically():
    masks = build_masks("dtr", T, C, alpha=4.0, beta=0.8)
    c_beta = active_channels(C, 0.8)
    starts = []
    for row in masks:
        start, end = window_bounds(row)
        assert end - start == c_beta
        starts.append(start)
    assert starts[0] == 0 and starts[-1] == C - c_beta  # first and last windows
    assert all(b >= a for a, b in zip(starts, starts[1:]))


def test_dtr_start_matches_released_code_formula():
    # Independent evaluation of start[t] = round((C - C_beta) * (t / (T - 1)) ** alpha) with Python's
    # round, which rounds half to even like numpy's.
    for alpha in (0.5, 1.0, 2.0, 4.0):
        masks = build_masks("dtr", T, C, alpha=alpha, beta=0.8)
        c_beta = active_channels(C, 0.8)
        for t in range(0, T, 37):
            expected = round((C - c_beta) * (t / (T - 1)) ** alpha)
            assert window_bounds(masks[t])[0] == expected, (alpha, t)


def test_alpha_moves_task_dedicated_channels_to_high_timesteps():
    def start_at(alpha, t):
        return window_bounds(build_masks("dtr", T, C, alpha=alpha, beta=0.8)[t])[0]
    # alpha > 1: the window barely moves over low t, so high t get the dedicated channels.
    assert start_at(4.0, T // 2) < start_at(1.0, T // 2) < start_at(0.25, T // 2)
    # alpha = 1 spreads the shift evenly: the midpoint sits in the middle of the free range.
    c_beta = active_channels(C, 0.8)
    assert abs(start_at(1.0, T // 2) - (C - c_beta) / 2) <= 1


def test_beta_one_gives_all_ones_like_no_routing():
    for kind in ("dtr", "random", "cdtr", "dtr-paper"):
        assert torch.equal(build_masks(kind, T, C, beta=1.0), torch.ones(T, C)), kind
    assert torch.equal(build_masks("none", T, C), torch.ones(T, C))


def test_dtr_paper_form_follows_eq4_bounds():
    alpha, beta = 4.0, 0.8
    masks = build_masks("dtr-paper", T, C, alpha=alpha, beta=beta)
    c_beta = active_channels(C, beta)
    for t1 in (1, 2, 500, 873, T):  # 1-based t of Eq. 4
        lo = round((C - c_beta) * ((t1 - 1) / T) ** alpha)
        hi = round((C - c_beta) * (t1 / T) ** alpha)
        expected = torch.tensor([1.0 if lo < c <= hi + c_beta else 0.0 for c in range(1, C + 1)])
        assert torch.equal(masks[t1 - 1], expected), t1
    # Rows are C_beta wide plus the window's move from t - 1 to t, so never narrower than C_beta; the first
    # window starts at channel 1 and the last ends at channel C (the upper bound at t = T is (C - C_beta) + C_beta).
    assert masks.sum(1).min() == c_beta and masks.sum(1).max() > c_beta
    assert masks[0, 0] == 1 and masks[-1, -1] == 1


def test_random_routing_is_seeded_and_reproducible():
    a = build_masks("random", T, C, beta=0.8, seed=3)
    b = build_masks("random", T, C, beta=0.8, seed=3)
    c = build_masks("random", T, C, beta=0.8, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) > T * 0.99  # rows are drawn independently


def test_random_routing_shares_c_beta_squared_over_c_channels_on_average():
    # Appendix B: for distinct tasks the expected overlap is the hypergeometric mean C_beta^2 / C.
    masks = build_masks("random", T, C, beta=0.5, seed=0)
    overlap = masks @ masks.T
    off_diag = overlap[~torch.eye(T, dtype=torch.bool)]
    c_beta = active_channels(C, 0.5)
    assert abs(off_diag.mean().item() - c_beta ** 2 / C) < 0.1
    # ...and it does not depend on how far apart the tasks are (no task affinity).
    near = torch.diagonal(overlap, 1).mean().item()
    far = torch.diagonal(overlap, T // 2).mean().item()
    assert abs(near - far) < 1.0


def test_cdtr_gives_one_dtr_window_per_uniform_cluster():
    masks = build_masks("cdtr", T, C, alpha=4.0, beta=0.8)
    cluster_masks = build_masks("dtr", 8, C, alpha=4.0, beta=0.8)
    for k in range(8):
        rows = masks[k * T // 8:(k + 1) * T // 8]
        assert (rows == cluster_masks[k]).all(), k
    # With alpha = 1 the 8 cluster windows are all distinct (alpha = 4 merges the low clusters).
    even = build_masks("cdtr", T, C, alpha=1.0, beta=0.8)
    assert len({tuple(r.tolist()) for r in even}) == 8


def test_ercdt_shares_half_and_splits_the_rest_into_disjoint_cluster_segments():
    masks = build_masks("ercdt", T, C)
    assert (masks[:, : C // 2] == 1).all()
    segments = [masks[k * T // 8, C // 2:] for k in range(8)]
    for k in range(8):
        assert (masks[k * T // 8:(k + 1) * T // 8] == masks[k * T // 8]).all()
    stacked = torch.stack(segments)
    assert (stacked.sum(0) == 1).all()  # disjoint and covering the task-specific half
    for seg in segments:
        window_bounds(seg)  # contiguous


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="dtr-v2"), "unknown routing kind"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(beta=0.0), "beta"),
    (dict(beta=1.2), "beta"),
    (dict(beta=0.01), "floor"),
    (dict(num_tasks=0), "num_tasks"),
    (dict(channels=0), "channels"),
])
def test_bad_arguments_are_rejected_with_a_clear_error(kwargs, message):
    args = dict(kind="dtr", num_tasks=T, channels=C, alpha=4.0, beta=0.8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_masks(**args)


def test_every_kind_keeps_its_row_rule_with_fewer_tasks_than_clusters():
    # 5 tasks < K = 8 clusters: each task is its own cluster, so CDTR is DTR and ERCDT gives each task a segment
    tasks, channels, alpha, beta = 5, 16, 1.0, 0.6
    c_beta = active_channels(channels, beta)  # 9
    dtr = build_masks("dtr", tasks, channels, alpha, beta)

    def ercdt_rule(m):
        tails = m[:, channels // 2:]
        return (m[:, :channels // 2] == 1).all() and (tails.sum(0) == 1).all() and (tails.sum(1) > 0).all()

    rules = {
        "none": lambda m: (m == 1).all(),
        "dtr": lambda m: (m.sum(1) == c_beta).all() and window_bounds(m[-1]) == (channels - c_beta, channels),
        "dtr-paper": lambda m: (m.sum(1) >= c_beta).all() and window_bounds(m[0])[0] == 0
        and window_bounds(m[-1])[1] == channels,
        "random": lambda m: (m.sum(1) == c_beta).all(),
        "cdtr": lambda m: torch.equal(m, dtr),
        "ercdt": ercdt_rule,
    }
    assert set(rules) == set(ROUTING_KINDS)  # a new kind brings its rule here
    for kind, rule in rules.items():
        masks = build_masks(kind, tasks, channels, alpha, beta)
        assert masks.shape == (tasks, channels) and ((masks == 0) | (masks == 1)).all(), kind
        assert rule(masks), kind


def test_a_diffusion_of_another_length_than_the_tables_is_refused():
    model = DiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=2, routing="dtr")
    check_routing_covers(model, T)  # tables of T rows, one per timestep
    with pytest.raises(ValueError, match="1000 rows .* T = 500"):
        check_routing_covers(model, 500)
    check_routing_covers(DiT(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2), 500)  # no tables


def test_router_gathers_one_row_per_timestep():
    router = TaskRouter("dtr", T, C)
    t = torch.tensor([0, 999, 250, 250])
    m = router(t)
    assert m.shape == (4, 1, C) and m.dtype == torch.float32
    table = build_masks("dtr", T, C)
    assert torch.equal(m[:, 0], table[t])
    assert torch.equal(router(t.float()), m)  # integral floats are accepted


@pytest.mark.parametrize("t, message", [
    (torch.tensor([1000]), "outside"),
    (torch.tensor([-1]), "outside"),
    (torch.tensor([3.5]), "integer"),
    (torch.tensor([[1, 2]]), "shape"),
])
def test_bad_timesteps_are_rejected_instead_of_clamped(t, message):
    with pytest.raises(ValueError, match=message):
        check_timesteps(t, len(t), T)



def test_router_table_is_not_in_state_dict_but_authors_key_is_checked():
    router = TaskRouter("dtr", T, C, alpha=4.0, beta=0.8)
    assert router.state_dict() == {}
    router.load_state_dict({"_unit_mapping": build_masks("dtr", T, C)})  # the authors' layout loads
    with pytest.raises(ValueError, match="differ"):
        router.load_state_dict({"_unit_mapping": build_masks("dtr", T, C, alpha=2.0)})
