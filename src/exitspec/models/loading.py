"""Moved: model loading now sits above the runtime and the heads, in exitspec/loading.py."""

raise ImportError("exitspec.loading moved to exitspec.loading: use `from exitspec.loading import load, "
                  "LoadedModel` (or `exitspec.load`)")
