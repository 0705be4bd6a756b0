"""Batch generation (`ldm-batch`): many prompts from a file, each row's images and one manifest line per image.

What belongs here: reading prompt files into rows with their seeds fixed (`rows`), making one row's images (`make`),
the output folder with its manifest and resume (`manifest`), the in-process loop and the command line (`run`), and
the Ray Data path that spreads rows over actors holding one model each (`ray_data`, imported only for `--ray`).
"""
