"""Cutting garments out of photos: Segment Anything with a cached image embedding, GrabCut without it."""
