"""Picking keypoint tokens from attention maps (SPEC 1.3 and 1.4).

Maps are ``[T, H, W]`` (one image, ``T`` tokens); token ids index ``T``.
Every function here is a ranking: none carries gradient.
"""

from __future__ import annotations

import torch

from skp_ray.heatmaps import argmax_centres, peak_targets

__all__ = [
    "gaussian_kl",
    "top_k_gaussian",
    "furthest_point_sampling",
    "token_pick_counts",
    "top_voted_tokens",
]

_EPS = 1e-5


def _check_token_maps(maps: torch.Tensor, name: str = "maps") -> None:
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape [T, H, W], got {list(maps.shape)}")


@torch.no_grad()
def gaussian_kl(
    maps: torch.Tensor, *, sigma: float = 2.0, num_subjects: int = 1, peak_disc: str = "centred"
) -> torch.Tensor:
    """Per-token KL(P_t || Q_t) ``[T]`` (SPEC 1.3), in float32 (float64 for float64 maps).

    ``P_t = (G_t + 1e-5) / sum``, ``G_t`` = :func:`peak_targets` (``num_subjects``, ``peak_disc`` as there);
    ``Q_t = softmax over pixels of (A_t + 1e-5)``.
    """
    _check_token_maps(maps)
    work = maps.detach().to(torch.promote_types(maps.dtype, torch.float32))
    p = peak_targets(work, sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc).flatten(1) + _EPS
    p = p / p.sum(dim=1, keepdim=True)
    log_q = torch.log_softmax(work.flatten(1) + _EPS, dim=1)
    return (p * (p.log() - log_q)).sum(dim=1)


@torch.no_grad()
def top_k_gaussian(
    maps: torch.Tensor, k: int, *, sigma: float = 2.0, num_subjects: int = 1, peak_disc: str = "centred"
) -> torch.Tensor:
    """The ``k`` tokens whose maps are closest to a Gaussian at their peak(s).

    ``maps`` ``[T, H, W]`` -> LongTensor ``[k]`` of token ids in ascending KL
    order (:func:`gaussian_kl`), ties by lower token id.
    """
    _check_token_maps(maps)
    num_tokens = maps.shape[0]
    if not 1 <= k <= num_tokens:
        raise ValueError(f"k must be in [1, T] = [1, {num_tokens}] (number of tokens), got {k}")
    kl = gaussian_kl(maps, sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc)
    return torch.sort(kl, stable=True).indices[:k]


@torch.no_grad()
def furthest_point_sampling(
    maps: torch.Tensor, k: int, candidates: torch.Tensor
) -> torch.Tensor:
    """Greedy furthest point sampling of ``k`` tokens among ``candidates``.

    ``maps`` ``[T, H, W]``, ``candidates`` LongTensor ``[C]`` of token ids ->
    LongTensor ``[k]`` of token ids. Locations are the argmax pixel centres of
    ``maps[candidates]``. Starts from the pair with the largest Euclidean
    distance (first maximum over ``i < j`` in candidate order), then adds the
    candidate whose minimum distance to the chosen set is largest (first in
    candidate order on ties). Order: ``i``, ``j``, then the greedy picks.
    """
    _check_token_maps(maps)
    if candidates.ndim != 1:
        raise ValueError(f"candidates must have shape [C], got {list(candidates.shape)}")
    num = candidates.shape[0]
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k > num:
        raise ValueError(f"top_k ({k}) is larger than the number of candidates ({num})")
    candidates = candidates.to(device=maps.device, dtype=torch.long)
    if k == 1:
        return candidates[:1].clone()

    points = argmax_centres(maps[candidates])  # [C, 2]
    dist = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1).sqrt()  # [C, C]
    # Row-major argmax over the strict upper triangle = first maximum of the i < j scan.
    upper = torch.ones(num, num, dtype=torch.bool, device=dist.device).triu(diagonal=1)
    first = int(dist.masked_fill(~upper, -1.0).flatten().argmax())
    chosen = [first // num, first % num]

    taken = torch.zeros(num, dtype=torch.bool, device=dist.device)
    taken[chosen] = True
    min_dist = torch.minimum(dist[chosen[0]], dist[chosen[1]])
    while len(chosen) < k:
        nxt = int(min_dist.masked_fill(taken, -1.0).argmax())
        chosen.append(nxt)
        taken[nxt] = True
        min_dist = torch.minimum(min_dist, dist[nxt])
    return candidates[torch.tensor(chosen, device=candidates.device)]


@torch.no_grad()
def token_pick_counts(
    maps: torch.Tensor,
    *,
    top_k: int = 10,
    furthest_point_num_samples: int = 25,
    sigma: float = 2.0,
    num_subjects: int = 1,
    peak_disc: str = "centred",
) -> torch.Tensor:
    """How often each token is picked over ``N`` images (SPEC 1.4).

    ``maps`` ``[N, T, H, W]`` -> LongTensor ``[T]``. Per image: the
    ``furthest_point_num_samples`` lowest-KL tokens, then FPS to ``top_k`` on
    the same maps.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape [N, T, H, W], got {list(maps.shape)}")
    counts = torch.zeros(maps.shape[1], dtype=torch.long, device=maps.device)
    for image_maps in maps:
        candidates = top_k_gaussian(
            image_maps, furthest_point_num_samples, sigma=sigma, num_subjects=num_subjects, peak_disc=peak_disc
        )
        chosen = furthest_point_sampling(image_maps, top_k, candidates)
        counts += torch.bincount(chosen, minlength=maps.shape[1])
    return counts


def top_voted_tokens(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most picked tokens: ``counts`` ``[T]`` -> LongTensor ``[k]``.

    Descending count; ties by lower token id.
    """
    if counts.ndim != 1:
        raise ValueError(f"counts must have shape [T], got {list(counts.shape)}")
    if not 1 <= k <= counts.shape[0]:
        raise ValueError(
            f"k must be in [1, T] = [1, {counts.shape[0]}] (number of tokens), got {k}"
        )
    return torch.sort(counts, descending=True, stable=True).indices[:k]
