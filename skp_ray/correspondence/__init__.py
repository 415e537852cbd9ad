"""Semantic correspondence from diffusion models: DIFT features (SPEC 2), matching, PCK and pairs manifests."""

from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.matching import match_points
from skp_ray.correspondence.pairs import build_pairs, read_pairs, write_pairs
from skp_ray.correspondence.pck import correspondence_pck, summarise_pck

__all__ = [
    "build_pairs",
    "correspondence_pck",
    "dift_features",
    "draw_dift_noise",
    "encode_prompt",
    "match_points",
    "read_pairs",
    "summarise_pck",
    "write_pairs",
]
