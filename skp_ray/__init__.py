"""skp_ray: Stable Keypoints (unsupervised keypoints from Stable Diffusion's cross-attention) and diffusion-feature
correspondence (DIFT, prompt-optimised contexts), at scale."""

from skp_ray.attention import attention_maps, captured_layer_names
from skp_ray.correspondence import correspondence_pck, dift_features, locate_point, match_points, optimize_point_contexts
from skp_ray.detection import count_token_picks, detect_keypoints, detect_with_confidence, select_keypoint_tokens
from skp_ray.diffusion import Diffusion, ModelNotFoundError, load_diffusion, make_tiny_diffusion
from skp_ray.geometry import random_affine, unwarp, warp
from skp_ray.losses import equivariance_loss, sharpening_loss
from skp_ray.optimization import optimize_context, training_loss
from skp_ray.selection import furthest_point_sampling, top_k_gaussian

__all__ = [
    "Diffusion",
    "ModelNotFoundError",
    "attention_maps",
    "captured_layer_names",
    "correspondence_pck",
    "count_token_picks",
    "detect_keypoints",
    "detect_with_confidence",
    "dift_features",
    "equivariance_loss",
    "furthest_point_sampling",
    "load_diffusion",
    "locate_point",
    "make_tiny_diffusion",
    "match_points",
    "optimize_context",
    "optimize_point_contexts",
    "random_affine",
    "select_keypoint_tokens",
    "sharpening_loss",
    "top_k_gaussian",
    "training_loss",
    "unwarp",
    "warp",
]
