"""The one training loop, its step, checkpoints and the extension point variants plug into."""
