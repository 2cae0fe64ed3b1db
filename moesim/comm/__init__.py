"""Communication: all-to-all algorithms that turn token counts into network flows."""
