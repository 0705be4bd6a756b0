"""Train a model from YAML configs with pytorch-lightning, as the original `main.py` does.

    python main.py --base configs/demo/digits-autoencoder.yaml -t      # stage 1, logs/digits-autoencoder/
    python main.py --base configs/demo/digits.yaml -t                  # stage 2, logs/digits/
    python main.py -r logs/digits -t                                   # resume from logs/digits/checkpoints/last.ckpt

A config names the model (`model:`), the LightningModule that trains it (`training:`, given `model.params`
plus its own `params`), the data (`data:`) and `lightning.trainer` arguments. Extra `key=value` arguments
override config entries (OmegaConf dot-list, e.g. `lightning.trainer.max_steps=100`). Each run writes its merged
config, CSV metrics and `checkpoints/last.ckpt` (original layout: txt2img loads it as is) under its log dir.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm.util import get_obj_from_str, instantiate_from_config


class TrainUsageError(ValueError):
    """Bad command-line input, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="config.yaml", help="configs, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without it: build everything and stop)")
    p.add_argument("-r", "--resume", default="", metavar="LOGDIR", help="resume the run in this log dir")
    p.add_argument("-n", "--name", default="", help="run name (default: the last config's file name)")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("-l", "--logdir", default="logs", help="parent dir of the runs' log dirs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: all cores)")
    return p


def resolve_run(opt: argparse.Namespace, overrides: Sequence[str]) -> tuple[DictConfig, Path, Path | None]:
    """The merged config, the run's log dir, and the checkpoint to resume from (if any)."""
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise TrainUsageError(f"unknown argument {item!r} (config overrides look like key.path=value)")
    configs = []
    resume_ckpt = None
    if opt.resume:
        logdir = Path(opt.resume)
        if logdir.is_file():  # a path to .../checkpoints/last.ckpt
            logdir = logdir.parent.parent
        resume_ckpt = logdir / "checkpoints" / "last.ckpt"
        if not resume_ckpt.is_file():
            raise TrainUsageError(f"cannot resume: {resume_ckpt} does not exist")
        configs.append(OmegaConf.load(logdir / "config.yaml"))
    elif not opt.base:
        raise TrainUsageError("give a config with --base configs/... (or resume a run with -r logs/NAME)")
    for path in opt.base:
        if not Path(path).is_file():
            raise TrainUsageError(f"config file not found: {path}")
        configs.append(OmegaConf.load(path))
    config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    if not opt.resume:
        logdir = Path(opt.logdir) / (opt.name or Path(opt.base[-1]).stem)
        if opt.train and (logdir / "checkpoints").exists():
            raise TrainUsageError(f"{logdir} already holds a run: resume it with -r {logdir} or name a new one with -n")
    for section in ("model", "training", "data"):
        if section not in config:
            raise TrainUsageError(f"the config has no '{section}:' section (see configs/demo/ for complete ones)")
    return config, logdir, resume_ckpt


def build_module(config: DictConfig):
    """The training module: `training.target` given `model.params` and `training.params`."""
    params = {**OmegaConf.to_container(config.model.get("params", {}), resolve=True)}
    params.update(OmegaConf.to_container(config.training.get("params", {}) or {}, resolve=True))
    if config.get("lora") is not None:  # a LoRA run: ldm.training.lora.LoraTrainer takes the section as is
        params["lora"] = OmegaConf.to_container(config.lora, resolve=True)
    return get_obj_from_str(config.training.target)(**params)


def train(opt: argparse.Namespace, overrides: Sequence[str]) -> Path | None:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    config, logdir, resume_ckpt = resolve_run(opt, overrides)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    pl.seed_everything(opt.seed, workers=True, verbose=False)
    module = build_module(config)
    data = instantiate_from_config(config.data)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    print(f"{type(module).__name__}: {trainable:,} trainable of {total:,} parameters; "
          f"{len(data.train)} training items; log dir {logdir}")
    if not opt.train:
        return None
    logdir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, logdir / "config.yaml")
    lightning = OmegaConf.to_container(config.get("lightning", {}) or {}, resolve=True)
    every = lightning.get("checkpoint_every_n_steps", 500)
    trainer = pl.Trainer(
        default_root_dir=str(logdir),
        logger=CSVLogger(save_dir=str(logdir), name="metrics"),  # metrics/version_N/ per (re)start
        callbacks=[ModelCheckpoint(dirpath=str(logdir / "checkpoints"), every_n_train_steps=every, save_last=True)],
        **lightning.get("trainer", {}),
    )
    val = data.val_dataloader() if len(data.val) else None
    trainer.fit(module, data.train_dataloader(), val, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    last = logdir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(str(last))
    print(f"Saved {last} (global step {trainer.global_step})")
    return last


def main(argv: Sequence[str] | None = None) -> int:
    opt, overrides = build_parser().parse_known_args(argv)
    try:
        train(opt, overrides)
    except TrainUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
