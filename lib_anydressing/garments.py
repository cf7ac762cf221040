"""The garment categories: one vocabulary for the slots of the accordion, the API, the infotext, the training
manifests and the GFE slots of AnyDressing models (a slot name is a category)."""

from __future__ import annotations

CATEGORIES = ("upper", "lower", "dress", "hat", "shoes", "bag", "other")
