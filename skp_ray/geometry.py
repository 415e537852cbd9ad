"""Invertible random affine transforms for images and attention maps.

Conventions (SPEC 1.3): ``theta`` is a ``[2, 3]`` matrix (``[B, 2, 3]`` for a
batch) in the normalised ``[-1, 1]`` coordinates of ``F.affine_grid`` with
``align_corners=False``. It maps *output* coordinates ``(x, y, 1)`` to *input*
coordinates, so ``warp(x, theta)[..., i, j]`` samples ``x`` at
``theta @ (x_j, y_i, 1)``. Note that inside theta the first coordinate is x
(column), unlike the ``(y, x)`` order used for points elsewhere in skp_ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_affine", "inverse_affine", "warp", "unwarp"]


def random_affine(
    batch: int,
    *,
    degrees: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.0),
    translate: tuple[float, float] = (0.25, 0.25),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``batch`` random affine matrices, returned as ``[batch, 2, 3]``.

    Draw order (reproducible from a seed): one call
    ``u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)`` on
    the generator's device (CPU without a generator), whose columns give, per
    image,

    - angle ``a = (2 u[:, 0] - 1) * degrees`` (degrees),
    - scale ``s = scale[0] + (scale[1] - scale[0]) * u[:, 1]``,
    - ``tx = (2 u[:, 2] - 1) * translate[0]`` (x, normalised),
    - ``ty = (2 u[:, 3] - 1) * translate[1]`` (y, normalised).

    ``theta = [[s cos a, s sin a, tx], [-s sin a, s cos a, ty]]``, computed in
    float64 and then cast to ``dtype`` and moved to ``device``. Use a CPU
    generator (or None, the global CPU one) for results that do not depend on
    the hardware; a CUDA generator is accepted and draws on its own device.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if len(scale) != 2 or len(translate) != 2:
        raise ValueError("scale and translate must each be a pair of floats")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64, device=draw_device)
    u = u.cpu()
    angle = torch.deg2rad((2.0 * u[:, 0] - 1.0) * degrees)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    tx = (2.0 * u[:, 2] - 1.0) * translate[0]
    ty = (2.0 * u[:, 3] - 1.0) * translate[1]
    cos, sin = s * torch.cos(angle), s * torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, sin, tx], dim=-1), torch.stack([-sin, cos, ty], dim=-1)],
        dim=-2,
    )
    return theta.to(device=device, dtype=dtype)


def inverse_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of affine matrices ``[..., 2, 3]`` via the 3 x 3 augmented matrix.

    Computed in at least float32 (``torch.linalg.inv`` has no half support) and
    returned in ``theta``'s dtype, shape ``[..., 2, 3]``.
    """
    if theta.ndim < 2 or tuple(theta.shape[-2:]) != (2, 3):
        raise ValueError(f"theta must have shape [..., 2, 3], got {tuple(theta.shape)}")
    work = theta.to(torch.promote_types(theta.dtype, torch.float32))
    bottom = torch.zeros(*work.shape[:-2], 1, 3, dtype=work.dtype, device=work.device)
    bottom[..., 0, 2] = 1.0
    full = torch.cat([work, bottom], dim=-2)
    return torch.linalg.inv(full)[..., :2, :].to(theta.dtype)


def _check_pair(x: torch.Tensor, theta: torch.Tensor) -> None:
    if x.ndim == 4:
        if tuple(theta.shape) != (x.shape[0], 2, 3):
            raise ValueError(
                f"theta must have shape [B, 2, 3] = [{x.shape[0]}, 2, 3] for x of shape "
                f"[B, C, H, W] = {list(x.shape)}, got {list(theta.shape)}"
            )
    elif x.ndim == 3:
        if tuple(theta.shape) != (2, 3):
            raise ValueError(
                f"theta must have shape [2, 3] for a single x of shape [C, H, W] = "
                f"{list(x.shape)}, got {list(theta.shape)}"
            )
    else:
        raise ValueError(f"x must have shape [B, C, H, W] or [C, H, W], got {list(x.shape)}")


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp ``x`` with ``theta`` (output coordinates -> input coordinates).

    ``x`` is ``[B, C, H, W]`` with ``theta`` ``[B, 2, 3]``, or a single
    ``[C, H, W]`` with ``theta`` ``[2, 3]`` (result ``[C, H, W]``). Bilinear
    sampling, zero padding, ``align_corners=False``. ``theta`` is cast to
    ``x``'s dtype and device; gradients flow to ``x``.
    """
    _check_pair(x, theta)
    single = x.ndim == 3
    if single:
        x, theta = x.unsqueeze(0), theta.unsqueeze(0)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] if single else out


def unwarp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Undo ``warp(., theta)``: ``warp(x, inverse_affine(theta))``, same shapes as :func:`warp`."""
    _check_pair(x, theta)
    return warp(x, inverse_affine(theta))
