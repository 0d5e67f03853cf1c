"""Suite-wide settings: property tests are bounded and derandomized so CI runs are reproducible."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")
