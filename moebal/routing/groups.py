"""Group-limited (node-limited) routing: each token keeps its best groups of experts.

DeepSeek-V3 (``n_group``/``topk_group``), Megatron-core (``moe_router_num_groups``/
``moe_router_group_topk``) and torchtitan (``num_expert_groups``/``num_limited_groups``)
split the E experts into G equal groups of consecutive ids (a group is a node, or a
device, of expert parallelism), score each group per token, keep each token's best
``group_topk`` groups and take its top-k among their experts. They score a group by:

- ``"top2"``: the sum of its two highest scores (DeepSeek-V3, torchtitan);
- ``"topk_share"``: the sum of its ``K // group_topk`` highest (Megatron-core).

All three score the choice scores (the scores plus the expert bias, where there is one);
moebal scores whatever the balancer ranks experts by (``Balancer.choice_scores``).
"""

from __future__ import annotations

import torch

from moebal.routing.validate import check_choice, check_int

GROUP_SCORES = ("top2", "topk_share")


def group_scores_TG(
    choice_TE: torch.Tensor, num_groups: int, group_topk: int, top_k: int, group_score: str
) -> torch.Tensor:
    """``[T, G]``: each group's score for each token (see the module docstring)."""
    T, E = choice_TE.shape
    per = top_k // group_topk if group_score == "topk_share" else 2
    return choice_TE.view(T, num_groups, E // num_groups).topk(per, dim=-1).values.sum(-1)


def group_mask_TE(
    choice_TE: torch.Tensor, num_groups: int, group_topk: int, top_k: int, group_score: str
) -> torch.Tensor:
    """bool ``[T, E]``: True on the experts of each token's ``group_topk`` best groups."""
    T, E = choice_TE.shape
    scores_TG = group_scores_TG(choice_TE, num_groups, group_topk, top_k, group_score)
    chosen_TG = torch.topk(scores_TG, group_topk, dim=-1, sorted=False).indices
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=choice_TE.device)
    keep_TG.scatter_(1, chosen_TG, True)
    return keep_TG.repeat_interleave(E // num_groups, dim=1)


def check_groups(
    num_experts: int, top_k: int, num_groups: object, group_topk: object, group_score: object
) -> None:
    """ValueError naming the bad value unless the three make a valid group limit."""
    if num_groups is None and group_topk is None:
        return
    if num_groups is None or group_topk is None:
        raise ValueError(
            f"num_groups and group_topk come together, got num_groups={num_groups!r}, "
            f"group_topk={group_topk!r}")
    check_int("num_groups", num_groups, minimum=1)
    check_int("group_topk", group_topk, minimum=1)
    check_choice("group_score", group_score, GROUP_SCORES)
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups!r} does not divide num_experts={num_experts}")
    if group_topk > num_groups:
        raise ValueError(f"group_topk={group_topk!r} exceeds num_groups={num_groups}")
    per_group = num_experts // num_groups
    if group_topk * per_group < top_k:
        raise ValueError(
            f"group_topk={group_topk!r} groups of {per_group} experts hold fewer than "
            f"top_k={top_k}")
    if group_score == "top2" and per_group < 2:
        raise ValueError(f"group_score='top2' needs 2 experts per group, got {per_group}")
    if group_score == "topk_share" and not 1 <= top_k // group_topk <= per_group:
        raise ValueError(
            f"group_score='topk_share' sums top_k // group_topk = {top_k // group_topk} "
            f"scores per group; it must be in 1..{per_group}")
