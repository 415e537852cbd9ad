"""Semantic correspondence from diffusion models: DIFT features (SPEC 2), prompt-optimised contexts (SPEC 3),
matching, PCK and pairs manifests.

The names below are imported on first use (PEP 562), as ``skp_ray``'s are: the correspondence job's driver
imports this package without torch and diffusers.
"""

from skp_ray import lazy_exports

_EXPORTS = {
    "features": ["dift_features", "draw_dift_noise", "encode_prompt"],
    "ldm_contexts": ["OptimisedContexts", "optimize_point_contexts"],
    "ldm_locate": ["LocatedPoints", "locate_point"],
    "matching": ["match_points"],
    "pairs": ["build_pairs", "read_pairs", "write_pairs"],
    "pck": ["correspondence_pck", "summarise_pck"],
}
__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
