"""skp_ray: Stable Keypoints (unsupervised keypoints from Stable Diffusion's cross-attention) and diffusion-feature
correspondence (DIFT, prompt-optimised contexts), at scale.

The package's names are imported on first use (PEP 562), so a Ray worker that only lists, decodes or
writes does not pay for importing torch and diffusers (about 7 s a process on 2 cores).
"""

import importlib

_EXPORTS = {
    "attention": ["attention_maps", "captured_layer_names"],
    "correspondence": ["correspondence_pck", "dift_features", "locate_point", "match_points", "optimize_point_contexts"],
    "detection": ["count_token_picks", "detect_keypoints", "detect_with_confidence", "select_keypoint_tokens"],
    "diffusion": ["Diffusion", "load_diffusion", "make_tiny_diffusion"],
    "geometry": ["random_affine", "unwarp", "warp"],
    "losses": ["equivariance_loss", "sharpening_loss"],
    "model_source": ["ModelNotFoundError"],
    "optimization": ["optimize_context", "training_loss"],
    "selection": ["furthest_point_sampling", "top_k_gaussian"],
}


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``(__all__, __getattr__)`` for a package whose names (``exports``: module -> names) are imported from
    ``<package>.<module>`` on first use (PEP 562)."""
    module_of = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return sorted(module_of), __getattr__


__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
