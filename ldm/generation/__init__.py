"""Making images: config + checkpoint to a loaded model (`load`), prompts to conditioning, the txt2img and
img2img/inpainting loops, pre-flight checks, and the Python `Pipeline`. Not here: network layers
(`ldm.modules`), samplers (`ldm.samplers`), file formats (`ldm.files`), speed-only code (`ldm.speed`)."""
