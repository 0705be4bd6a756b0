"""Command-line entry points (txt2img, img2img): flags, validation, one-line errors; the work is in `ldm.generation`."""
