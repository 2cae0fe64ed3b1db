"""Hardware: profiles (GPU, node, fabric facts with sources) and the network topology."""

from moesim.hardware.profile import HardwareProfile

__all__ = ["HardwareProfile"]
