"""Model zoo: the pre-activation wide ResNet with explicit top-k sites."""

from jaxsparse.models.wrn import WRN10_1, WRN16_2, WRN28_4, WideResNet, resolve_conv, site_densities

__all__ = ["WideResNet", "WRN28_4", "WRN16_2", "WRN10_1", "resolve_conv", "site_densities"]
