"""The tinyrt converter (host side, needs torch): nn.Module + state dict -> ``.tinyrt`` file."""
