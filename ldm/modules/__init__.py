"""Network layers at the original's import paths, so checkpoint keys load as they are: UNet, VAE, CLIP text encoder."""
