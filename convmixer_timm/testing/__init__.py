"""Test helpers for convmixer-timm: an offline Hugging Face Hub server and its client environment."""
