"""The real SD 1.5 UNet shape (random weights, ~860 M parameters) at 256 px."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from skp_ray.attention import attention_maps, captured_layer_names
from skp_ray.diffusion import SD15_UNET, Diffusion

@pytest.mark.slow
def test_sd15_unet_captures_the_published_layers_at_256px(tiny):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6
    names = captured_layer_names(unet)
    assert names[:4] == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    ]
    assert len(names) == 6 and all(name.startswith(("up_blocks.1.", "up_blocks.2.")) for name in names)
    assert {unet.get_submodule(name).heads for name in names} == {8}

    # The tiny model's VAE (8x, 4 latent channels) feeds the real-shape UNet.
    model = Diffusion(unet=unet, vae=tiny.vae, scheduler=tiny.scheduler, model_id="sd15-shape")
    assert model.image_size == 512 and model.context_dim == 768
    grids = []
    hooks = [unet.get_submodule(name).register_forward_pre_hook(lambda m, args: grids.append(args[0].shape[1])) for name in names]
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    context = torch.randn(5, 768, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            maps = attention_maps(model, images, context, image_size=256, generator=torch.Generator().manual_seed(2))
    finally:
        for hook in hooks:
            hook.remove()
    assert grids == [8 * 8] * 3 + [16 * 16]  # early exit after the fourth layer, native grids at 256 px
    assert maps.shape == (1, 5, 128, 128)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(1, 128, 128))
