"""The `interrogate` kind: CLIP Interrogator prompts (a caption plus the closest terms)."""
