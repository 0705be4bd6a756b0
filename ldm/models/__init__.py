"""The original's model classes at the original's import paths (config `target:`s): latent diffusion and the VAE."""
