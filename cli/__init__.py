"""The `captioner` command: the top layer, the one place that knows both producers and workers."""
