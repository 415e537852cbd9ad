"""Semantic correspondence from diffusion models: DIFT features (SPEC 2), prompt-optimised contexts (SPEC 3),
matching, PCK and pairs manifests."""

from skp_ray.correspondence.features import dift_features, draw_dift_noise, encode_prompt
from skp_ray.correspondence.ldm_contexts import OptimisedContexts, optimize_point_contexts
from skp_ray.correspondence.ldm_locate import LocatedPoints, locate_point
from skp_ray.correspondence.matching import match_points
from skp_ray.correspondence.pairs import build_pairs, read_pairs, write_pairs
from skp_ray.correspondence.pck import correspondence_pck, summarise_pck

__all__ = [
    "LocatedPoints",
    "OptimisedContexts",
    "build_pairs",
    "correspondence_pck",
    "dift_features",
    "draw_dift_noise",
    "encode_prompt",
    "locate_point",
    "match_points",
    "optimize_point_contexts",
    "read_pairs",
    "summarise_pck",
    "write_pairs",
]
