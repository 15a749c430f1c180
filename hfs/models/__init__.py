"""Backbones and margin heads behind registries."""
