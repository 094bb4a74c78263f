"""The `lpips` PyTorch package (`pip install --no-deps lpips==0.1.4`) with a random VGG16 trunk.

torchvision cannot be installed beside this torch build, so a minimal stand-in module provides
`torchvision.models.vgg16(...).features` with torchvision's exact layer stack (seeded random
weights); the linear heads are the package's published v0.1 vgg.pth.
"""

import sys
import types

import torch

_VGG16_STACK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def torchvision_vgg16_features() -> "torch.nn.Sequential":
    """torchvision.models.vgg16().features: convs (3x3, pad 1), in-place ReLUs, 2x2 max-pools."""
    nn = torch.nn
    layers, in_channels = [], 3
    for v in (*_VGG16_STACK, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def reference_lpips(seed: int = 0):
    """(lpips.LPIPS(net="vgg") in eval mode, torchvision-layout VGG16 state dict, heads dict)."""
    torch.manual_seed(seed)
    features = torchvision_vgg16_features()
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(
        vgg16=lambda *a, **k: types.SimpleNamespace(features=features)
    )
    saved = sys.modules.get("torchvision")
    sys.modules["torchvision"] = fake
    try:
        _forget_lpips()  # re-import, so lpips binds this call's stand-in
        import lpips

        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    finally:
        _forget_lpips()
        if saved is None:
            sys.modules.pop("torchvision", None)
        else:
            sys.modules["torchvision"] = saved
    vgg16_sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    heads_sd = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
    return model, vgg16_sd, heads_sd


def _forget_lpips() -> None:
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        del sys.modules[name]
